"""Which recipe makes a small model answer well: train and score a list of recipes, one row each.

Every recipe is a set of loraqa settings on top of a shared base (the standard budget: the first
1,000 training questions, one epoch, batch 4). Each row is an ordinary run folder made by
``loraqa train`` in its own process (so it resumes from its checkpoints when interrupted, and a
finished one is reused, not retrained); its row is appended to ``results.jsonl`` and the table of
every row so far is printed.

    G=$(../shared/tools/get-smollm2)
    python benchmarks/quality.py --model $G \
        --train-file ../shared/data/squad/proxy-train-v1.1.json \
        --eval-file ../shared/data/squad/proxy-dev-v1.1.json --recipes standard,recommended

``--eval-examples N`` scores the first N evaluation questions (quick sweeps); without it, all.
``--set NAME:key=value;key=value`` adds a recipe (``--set r32:r=32;lora_alpha=64``).
CPU budget: a SmolLM2-135M row takes ~5-13 minutes of training per 1,000 questions on 2 cores
(passage batches / plain batches) plus ~5 minutes to score all 1,521 proxy-dev questions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from loraqa.compare import parse_extra, run_in_subprocess, same_run
from loraqa.config import find_config, load_config
from loraqa.io import write_jsonl_atomic

BASE = {"max_train_examples": 1000, "epochs": 1, "batch_size": 4, "max_length": 768, "eval_loss_examples": 200}
LLAMA_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
RECIPES = {
    # transformers.Trainer + PEFT defaults: LoraConfig() is r=8, alpha=8, no dropout, q_proj+v_proj
    # for Llama; Trainer's AdamW without weight decay, linear decay without warmup, clipping at 1
    "standard": {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                 "lr": 2e-4, "warmup_ratio": 0.0, "weight_decay": 0.0},
    # the write-up's recipe with Llama's names for the attention projections
    "writeup": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
    "recommended": "recommended",  # the shipped preset (src/loraqa/configs/recommended.yaml)
    # the recommended recipe on 4,000 questions, one epoch: ~45 minutes of this CPU's training
    "recommended-4k": {"preset": "recommended", "max_train_examples": 4000},
    # does the best learning rate move with more data? recommended-4k at lr 3e-4
    "recommended-4k-lr3e-4": {"preset": "recommended", "max_train_examples": 4000, "lr": 3e-4},
    # the bigger-budget preset (src/loraqa/configs/best.yaml): every training question, ~2 hours here
    "best": {"preset": "best", "max_train_examples": None},
    # the same adapter settings, answers held to spans of the passage (--constrain-to-context)
    "recommended-held": {"preset": "recommended", "constrain_to_context": True},
    # the recommended LoRA settings with an extractive start/end head instead of generation
    "span": {"preset": "recommended", "method": "span"},
}
PRESET_IGNORED = ("model", "train_file", "eval_file", "output_dir", "max_eval_examples", *BASE)
# The sweep (quick rows: --eval-examples 300). Passage batches throughout (--group-by-passage), after
# checking on the write-up's recipe that they do not change quality; each family varies one thing.
_ALL_LINEAR = {"target_modules": ["all-linear"], "r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
               "lr": 1e-3, "group_by_passage": True}
SWEEP = {
    "writeup-passages": {**RECIPES["writeup"], "group_by_passage": True},
    "all-linear": _ALL_LINEAR,
    "all-linear-lr5e-4": {**_ALL_LINEAR, "lr": 5e-4},
    "all-linear-lr2e-3": {**_ALL_LINEAR, "lr": 2e-3},
    "all-linear-lr2e-4": {**_ALL_LINEAR, "lr": 2e-4},
    # each varies one thing from the shipped preset (all-linear-lr5e-4 above is the preset's own recipe)
    "recommended-attention": {"preset": "recommended", "target_modules": LLAMA_ATTENTION},
    "recommended-r4": {"preset": "recommended", "r": 4, "lora_alpha": 8},
    "recommended-r64": {"preset": "recommended", "r": 64, "lora_alpha": 128},
    "recommended-r64-rslora": {"preset": "recommended", "r": 64, "lora_alpha": 32, "use_rslora": True},
    "recommended-dropout0": {"preset": "recommended", "lora_dropout": 0.0},
    "recommended-model-dropout0.1": {"preset": "recommended", "model_dropout": 0.1},
    "recommended-plain-template": {"preset": "recommended", "template": "{context}\n\nQ: {question}\nA:"},
    # SmolLM2-Instruct's own chat format around the labelled prompt (the answer follows "Answer:")
    "recommended-chat-template": {"preset": "recommended", "template": (
        "<|im_start|>user\nContext: {context}\nQuestion: {question}<|im_end|>\n<|im_start|>assistant\nAnswer:")},
    # epochs against examples at about the same wall time: half the questions, twice
    "recommended-500x2": {"preset": "recommended", "max_train_examples": 500, "epochs": 2},
}
RECIPES.update(SWEEP)


def recipe_settings(name: str, extra: dict[str, dict]) -> dict:
    """Settings for a named recipe: a dict above, a YAML preset, or a --set row."""
    if name in extra:
        return extra[name]
    if name not in RECIPES:
        raise SystemExit(f"unknown recipe {name!r} (known: {', '.join([*RECIPES, *extra])})")
    recipe = RECIPES[name]
    if isinstance(recipe, str):  # a preset: its recipe, not its model, data, budget or output folder
        preset = yaml.safe_load(find_config(recipe).read_text())
        return {k: v for k, v in preset.items() if k not in PRESET_IGNORED}
    if "preset" in recipe:  # a preset on another budget
        return {**recipe_settings(recipe["preset"], extra), **{k: v for k, v in recipe.items() if k != "preset"}}
    return recipe


def row_of(name: str, settings: dict, folder: Path) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text())
    return {"recipe": name, "settings": settings, "exact_match": metrics["exact_match"], "f1": metrics["f1"],
            "n_questions": metrics["n_questions"], "trainable_params": metrics["trainable_params"],
            "train_seconds": metrics["train_seconds"], "eval_seconds": metrics["eval_seconds"],
            "train_tokens": metrics["train_tokens"], "train_questions": metrics["train_questions"],
            "epochs": settings.get("epochs", BASE["epochs"]), "run": str(folder)}


def table(rows: list[dict]) -> str:
    lines = ["| recipe | eval q | EM | F1 | trainable | train min | eval min | tokens run | questions seen |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['n_questions']} | {r['exact_match']:.2f} | {r['f1']:.2f} | "
                     f"{r['trainable_params']:,} | {r['train_seconds'] / 60:.1f} | {r['eval_seconds'] / 60:.1f} | "
                     f"{r['train_tokens']:,} | {r['train_questions'] * r['epochs']:,} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="hub name, folder or .gguf file")
    p.add_argument("--train-file", required=True)
    p.add_argument("--eval-file", required=True)
    p.add_argument("--recipes", default="standard,recommended", help="comma-separated recipe names")
    p.add_argument("--set", action="append", default=[], metavar="NAME:KEY=VALUE[;KEY=VALUE]",
                   help="an extra recipe: settings on top of the base")
    p.add_argument("--eval-examples", type=int, help="score the first N evaluation questions (default: all)")
    p.add_argument("--output-dir", default="runs/quality", help="run folders and results.jsonl")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args()
    out = Path(args.output_dir)
    extra = {}
    for spec in args.set:
        name, settings = parse_extra(spec)
        extra[name] = settings
    results_path = out / "results.jsonl"
    rows = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.exists() else []
    suffix = f"-dev{args.eval_examples}" if args.eval_examples else ""  # quick sweeps score fewer questions
    names = args.recipes.split(",")
    for name in names + [n for n in extra if n not in names]:
        settings = recipe_settings(name, extra)
        folder = out / f"{name}{suffix}"
        config = load_config(None, {**BASE, **settings, "model": args.model, "train_file": args.train_file,
                                    "eval_file": args.eval_file, "max_eval_examples": args.eval_examples,
                                    "output_dir": str(folder)})
        if not same_run(folder, config):
            print(f"[quality] {name}: loraqa train -> {folder}", file=sys.stderr, flush=True)
            if not run_in_subprocess("train", config, out / ".requests" / f"{folder.name}.yaml", args.quiet):
                raise SystemExit(f"recipe {name} failed (see above); rerun the same command to resume it")
        row = row_of(name, settings, folder)
        rows = [r for r in rows if r["run"] != row["run"]] + [row]
        write_jsonl_atomic(results_path, rows)
    print(table(rows))


if __name__ == "__main__":
    main()
