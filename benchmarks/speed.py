"""loraqa vs the standard recipe, side by side, on the same examples: training and evaluation speed.

The standard recipe is what a user writes with the ecosystem's parts: ``transformers.Trainer`` +
PEFT LoRA (same r, alpha, dropout, targets), every example padded to a fixed length, fp32, the full
LM head, and ``model.generate`` one question at a time (with the same stop tokens and
``max_new_tokens``). Each phase runs in its own subprocess so peak memory is its own (host RSS on a CPU, allocated
GPU memory with ``--device cuda``).

    python benchmarks/speed.py --model ../shared/data/gpt2 --init random \
        --train-file ../shared/data/squad/proxy-train-v1.1.json \
        --eval-file ../shared/data/squad/proxy-dev-v1.1.json

Model FLOPs per real training token (frozen base, so backward computes input gradients only):
    4 * N_body + 8 * n_layer * d_model * T          (N_body: non-embedding weights, T: mean length)
plus 4 * d_model * V for each *answer* token (the LM head that the loss needs). The same useful
FLOPs are credited to both recipes; utilisation = achieved / the matmul peak measured here.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

PHASES = ["matmul", "train-loraqa", "train-standard", "eval-loraqa", "eval-standard"]


def peak_mb(args) -> float:
    """Peak host RSS on a CPU; peak allocated device memory on a GPU."""
    if args.device == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import torch
    return torch.cuda.max_memory_allocated() / 2 ** 20


def _sync(args) -> None:
    if args.device != "cpu":
        import torch
        torch.cuda.synchronize()


def phase_matmul(args) -> dict:
    """Peak matmul GFLOP/s per dtype; a small probe first, since bf16 without hardware support is slow."""
    import torch

    from loraqa.model.precision import native_bf16

    out = {}
    sizes = (512, 2048) if args.device == "cpu" else (2048, 8192)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for n in sizes:
            a, b = (torch.randn(n, n, dtype=dtype, device=args.device) for _ in range(2))
            a @ b
            _sync(args)
            reps, start = 0, time.perf_counter()
            while time.perf_counter() - start < 2.0:
                a @ b
                reps += 1
                if reps % 10 == 0:
                    _sync(args)
            _sync(args)
            gflops = 2 * n ** 3 * reps / (time.perf_counter() - start) / 1e9
            out[f"{name}_gflops"] = max(out.get(f"{name}_gflops", 0.0), gflops)
            out["native_bf16"] = native_bf16(torch.device(args.device))
            if gflops < 50:  # emulated: a 2048 product would take minutes and show nothing new
                break
    return out


def _setup(args, model: bool = True):
    import torch

    from loraqa.data.load import load_examples
    from loraqa.model.load import load_model, load_tokenizer

    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = load_model(args.model, args.init, args.seed).to(args.device) if model else None
    train = load_examples(args.train_file, "train", args.train_examples)
    evals = load_examples(args.eval_file, "validation", args.eval_examples)
    return model, tokenizer, train, evals


def _body_params(model) -> int:
    """Weights the model multiplies by for every token: all but the embeddings (and an untied head)."""
    body = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    if not model.config.tie_word_embeddings:
        body -= model.get_output_embeddings().weight.numel()
    return body


def _flops_per_token(model, mean_len: float, answer_share: float) -> float:
    config = model.config
    d, n_layer = config.hidden_size, config.num_hidden_layers
    return 4 * _body_params(model) + 8 * n_layer * d * mean_len + answer_share * 4 * d * config.vocab_size


def phase_train_loraqa(args) -> dict:
    import torch

    from loraqa.config import DEFAULT_TEMPLATE, Config
    from loraqa.data.features import build_train_features
    from loraqa.model.lora import add_lora
    from loraqa.model.precision import apply_precision
    from loraqa.training.loop import train
    from loraqa.training.loss import train_step_probe

    model, tokenizer, examples, _ = _setup(args)
    features, stats = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, args.max_length)
    flops = _flops_per_token(model, sum(len(f.input_ids) for f in features) / len(features),
                             sum(len(f.input_ids) - f.n_prompt for f in features) / sum(len(f.input_ids) for f in features))
    model = add_lora(model, args.r, 2 * args.r, 0.1)
    device = torch.device(args.device)
    precision, why = apply_precision(model, args.precision, device,  # what `loraqa train` does
                                     train_step_probe(model, features, args.batch_size, tokenizer.pad_token_id, device))
    config = Config(epochs=1, batch_size=args.batch_size, lr=2e-4, seed=args.seed)
    history, _ = train(model, features, [], config, pad_id=tokenizer.pad_token_id, device=device,
                       precision=precision, progress=False)
    row = history[0]
    return {"precision": precision, "why": why, "real_tokens": row["train_tokens"], "seconds": row["train_seconds"],
            "tokens_per_second": row["train_tokens_per_second"], "flops_per_token": flops,
            "dropped": stats.dropped, "peak_mb": peak_mb(args)}


def phase_train_standard(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from loraqa.data.prompt import format_target, prompt_of
    from loraqa.config import DEFAULT_TEMPLATE

    model, tokenizer, examples, _ = _setup(args)
    rows = []
    for ex in examples:  # what the user writes: pad to a fixed length, mask the prompt's labels
        prompt = prompt_of(ex, DEFAULT_TEMPLATE)
        n_prompt = len(tokenizer(prompt)["input_ids"])
        enc = tokenizer(prompt + format_target(ex.answer) + tokenizer.eos_token, max_length=args.fixed_length,
                        padding="max_length", truncation=True)
        labels = [t if i >= n_prompt and m else -100 for i, (t, m) in enumerate(zip(enc["input_ids"], enc["attention_mask"]))]
        rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    dataset = [{k: torch.tensor(v) for k, v in r.items()} for r in rows]
    targets = ["c_attn"] if model.config.model_type == "gpt2" else ["q_proj", "v_proj"]
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.1,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    training_args = TrainingArguments(output_dir="/tmp/loraqa-bench-trainer", per_device_train_batch_size=args.batch_size,
                                      num_train_epochs=1, learning_rate=2e-4, report_to="none", save_strategy="no",
                                      logging_strategy="no", disable_tqdm=True, use_cpu=args.device == "cpu", seed=args.seed)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    start = time.perf_counter()
    trainer.train()
    _sync(args)
    seconds = time.perf_counter() - start
    real = sum(sum(r["attention_mask"]) for r in rows)
    return {"real_tokens": real, "padded_tokens": len(rows) * args.fixed_length, "seconds": seconds,
            "tokens_per_second": real / seconds, "peak_mb": peak_mb(args)}


def _eval_flops(model, batches, pad_id: int, needed: dict[str, int]) -> float:
    """Useful model FLOPs of answering: each passage prefix once per group of its questions (the
    prefix loraqa's collate shares), each question's own tokens, and each generated token up to
    its stop (``needed``, by question id); the LM head only where a next token is chosen.
    Forward only: 2 * N_body per token, 4 * n_layer * d_model * position for attention, 2 *
    d_model * V per chosen token."""
    from loraqa.data.batching import collate_shared_prefix

    config = model.config
    d, n_layer, body = config.hidden_size, config.num_hidden_layers, _body_params(model)
    flops = 0.0
    for groups in batches:
        shared_lengths = collate_shared_prefix(groups, pad_id)["prefix_mask"].sum(-1).tolist()
        for group, shared in zip(groups, shared_lengths):
            flops += 2 * body * shared + 4 * n_layer * d * shared * (shared - 1) / 2
            for f in group:
                new = needed[f.id]
                fed = f.n_prompt - shared + new - 1  # its own prompt tokens, then each generated token but the last
                flops += 2 * body * fed + 4 * n_layer * d * sum(range(shared, shared + fed)) + 2 * d * config.vocab_size * new
    return flops


def phase_eval_loraqa(args) -> dict:
    from answer_profile import counting_rows  # benchmarks/, this script's folder

    from loraqa.config import Config
    from loraqa.data.batching import shared_prefix_batches
    from loraqa.inference.answerer import load_answerer
    from loraqa.inference.evaluation import evaluate
    from loraqa.inference.generate import stop_token_ids

    _, _, _, examples = _setup(args, model=False)
    config = Config(model=args.model, init=args.init, tokenizer=args.tokenizer, precision=args.precision, seed=args.seed,
                    max_length=args.max_length, max_new_tokens=args.max_new_tokens, eval_batch_size=args.eval_batch_size,
                    eval_batch_tokens=args.eval_batch_tokens)
    answerer = load_answerer(config, args.adapter, examples)  # what `loraqa evaluate` loads: the adapter merged
    stop_token_ids(answerer.tokenizer)  # cached on the tokenizer; computed before the clock, as for the standard recipe
    with counting_rows(answerer.model) as rows:
        start = time.perf_counter()
        predictions, _, metrics = evaluate(answerer.model, answerer.tokenizer, examples, answerer.settings,
                                           answerer.device, answerer.precision, progress=False)
        seconds = time.perf_counter() - start
    settings = answerer.settings  # the batches loraqa decoded, in its order
    features = answerer.features(examples)[0]
    batches = shared_prefix_batches(features, settings.batch_size, settings.batch_tokens, settings.max_new_tokens)
    needed = {f.id: rows.lengths[i] for i, f in enumerate(features)}  # the decoder's tags: places in features
    flops = _eval_flops(answerer.model, batches, answerer.tokenizer.pad_token_id, needed)
    return {"precision": answerer.precision, "why": answerer.precision_reason, "questions": len(examples),
            "seconds": seconds, "questions_per_second": len(examples) / seconds, "flops": flops,
            "f1": metrics["f1"], "predictions": predictions, "peak_mb": peak_mb(args)}


def phase_eval_standard(args) -> dict:
    import torch

    from loraqa.config import DEFAULT_TEMPLATE
    from loraqa.inference.generate import stop_token_ids
    from loraqa.scoring.squad_v1 import squad_scores
    from loraqa.data.prompt import cut_answer, prompt_of

    model, tokenizer, _, examples = _setup(args)
    if args.adapter:  # PEFT's model, as users load an adapter: applied unmerged
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    stops = stop_token_ids(tokenizer)  # the same stopping rule as loraqa: EOS or a newline
    predictions = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for ex in examples:
            enc = tokenizer(prompt_of(ex, DEFAULT_TEMPLATE), return_tensors="pt").to(args.device)
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            predictions[ex.id] = cut_answer(text)
    seconds = time.perf_counter() - start
    f1 = squad_scores({ex.id: ex.answers for ex in examples}, predictions)["f1"]
    return {"questions": len(examples), "seconds": seconds, "questions_per_second": len(examples) / seconds,
            "f1": f1, "predictions": predictions, "peak_mb": peak_mb(args)}


def run_phase(name: str, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--phase", name, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"phase {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--init", default="pretrained", choices=["pretrained", "random"])
    p.add_argument("--tokenizer")
    p.add_argument("--adapter", help="a trained adapter both evaluation phases answer with (loraqa merges it, "
                                     "the standard recipe applies it unmerged with PEFT)")
    p.add_argument("--train-file", required=True)
    p.add_argument("--eval-file", required=True)
    p.add_argument("--train-examples", type=int, default=200)
    p.add_argument("--eval-examples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--eval-batch-tokens", type=int, default=16384)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--fixed-length", type=int, default=384, help="the standard recipe's padded length")
    p.add_argument("--max-length", type=int, default=1024, help="loraqa's token budget")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--precisions", default="fp32,bf16",
                   help="loraqa's phases run once per precision (fp32, bf16, auto); the first is compared with the standard recipe")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)  # one phase's, from --precisions
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--phase", help=argparse.SUPPRESS)
    args, _ = p.parse_known_args()
    if args.phase:
        if args.phase.endswith("-loraqa"):  # what the `loraqa` command does at start
            from loraqa.runtime import keep_freed_memory
            keep_freed_memory()
        print(json.dumps(globals()["phase_" + args.phase.replace("-", "_")](args)))
        return
    argv = [a for a in sys.argv[1:]]
    precisions = args.precisions.split(",")
    results = {}
    for name in args.phases.split(","):
        for precision in precisions if name.endswith("-loraqa") else ["fp32"]:
            print(f"running {name} ({precision}) ...", file=sys.stderr, flush=True)
            results[f"{name}@{precision}"] = run_phase(name, [*argv, "--precision", precision])
    report(results, args, precisions)


def report(runs: dict, args, precisions: list[str]) -> None:
    import os
    import platform

    # loraqa's first precision against the standard recipe (fp32, as users run Trainer by default)
    r = {}
    for name, row in runs.items():
        phase, precision = name.split("@")
        if not phase.endswith("-loraqa") or precision == precisions[0]:
            r[phase] = row
    import torch

    where = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch CPU kernels {torch.backends.cpu.get_cpu_capability()}")
    if args.device != "cpu":
        where = f"{torch.cuda.get_device_name()} ({where})"
    memory = "peak RSS MB" if args.device == "cpu" else "peak GPU MB"
    print(f"\nmachine: {where}; model {args.model} "
          f"({args.init}); batch {args.batch_size}; {args.train_examples} train / {args.eval_examples} eval questions")
    if "matmul" in r:
        native = "native" if r["matmul"]["native_bf16"] else "emulated: no native bf16 here"
        print(f"matmul peak (largest square product): fp32 {r['matmul']['fp32_gflops']:.0f} GFLOP/s, "
              f"bf16 {r['matmul']['bf16_gflops']:.0f} GFLOP/s ({native})")
    if "train-loraqa" in r and "train-standard" in r:
        ours, std = r["train-loraqa"], r["train-standard"]
        print(f"train  real tokens/s   loraqa {ours['tokens_per_second']:8.1f}   standard {std['tokens_per_second']:8.1f}"
              f"   ratio {ours['tokens_per_second'] / std['tokens_per_second']:.2f}x   (loraqa in {ours['precision']})")
        print(f"train  {memory:15s} loraqa {ours['peak_mb']:8.0f}   standard {std['peak_mb']:8.0f}")
        if "matmul" in r:
            fp32, bf16 = r["matmul"]["fp32_gflops"], r["matmul"]["bf16_gflops"]
            for name, row in (("loraqa", ours), ("standard", std)):
                achieved = row["tokens_per_second"] * ours["flops_per_token"] / 1e9
                # bf16 slower than fp32 means emulated: a share of that "peak" would exceed 100% and mean nothing
                of_bf16 = f"{100 * achieved / bf16:.1f}% of bf16 peak" if bf16 > fp32 else "no native bf16 here"
                print(f"train  {name:8s} model {achieved:6.1f} GFLOP/s = {100 * achieved / fp32:.1f}% of fp32 peak, {of_bf16}")
    if "eval-loraqa" in r and "eval-standard" in r:
        ours, std = r["eval-loraqa"], r["eval-standard"]
        same = sum(ours["predictions"][k] == v for k, v in std["predictions"].items())
        print(f"eval   questions/s     loraqa {ours['questions_per_second']:8.2f}   standard {std['questions_per_second']:8.2f}"
              f"   ratio {ours['questions_per_second'] / std['questions_per_second']:.2f}x   (loraqa in {ours['precision']})")
        print(f"eval   {memory:15s} loraqa {ours['peak_mb']:8.0f}   standard {std['peak_mb']:8.0f}")
        print(f"eval   identical predictions: {same}/{len(std['predictions'])}; F1 loraqa {ours['f1']:.2f}, standard {std['f1']:.2f}")
        if "matmul" in r:
            fp32 = r["matmul"]["fp32_gflops"]
            for name, row in (("loraqa", ours), ("standard", std)):
                achieved = ours["flops"] / row["seconds"] / 1e9  # the same useful FLOPs credited to both
                print(f"eval   {name:8s} model {achieved:6.1f} GFLOP/s = {100 * achieved / fp32:.1f}% of fp32 peak")
            if "train-loraqa" in r:
                train_share = r["train-loraqa"]["tokens_per_second"] * r["train-loraqa"]["flops_per_token"] / 1e9 / fp32
                eval_share = ours["flops"] / ours["seconds"] / 1e9 / fp32
                print(f"eval   loraqa's share of the peak is {eval_share / train_share:.2f}x training's")
    native = r.get("matmul", {}).get("native_bf16")
    print("\nloraqa by precision (bf16: frozen weights stored in bf16, LoRA weights and optimizer fp32)")
    print(f"{'precision':10s} {'chosen':8s} {'bf16 here':10s} {'train tok/s':>12s} {'eval q/s':>9s}  why")
    for precision in precisions:
        t, e = runs.get(f"train-loraqa@{precision}", {}), runs.get(f"eval-loraqa@{precision}", {})
        chosen = t.get("precision") or e.get("precision") or "-"
        kind = "-" if native is None or chosen == "fp32" else "native" if native else "emulated"
        print(f"{precision:10s} {chosen:8s} {kind:10s} {t.get('tokens_per_second', float('nan')):12.1f} "
              f"{e.get('questions_per_second', float('nan')):9.2f}  {t.get('why') or e.get('why', '')}")


if __name__ == "__main__":
    main()
