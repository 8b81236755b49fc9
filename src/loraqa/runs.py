"""A run: the questions it reads, and the folder of plain files it writes (no torch needed to read them).

    config.yaml        resolved settings          history.jsonl   one row per epoch
    steps.jsonl        the loss curve, a point every 10 optimizer steps
    predictions.json   {question id: answer}      metrics.json    scores, sizes, times, counts
    na_probs.json      no-answer probabilities, where there are unanswerable questions
    adapter/           PEFT adapter (LoRA)   or   model/          full model + tokenizer (full)
    checkpoints/       while training             tensorboard/    event files, with --report-to tensorboard
"""

from __future__ import annotations

from pathlib import Path

import yaml

from loraqa.config import RESUME_MAY_CHANGE, Config, save_config
from loraqa.data.documents import document_level
from loraqa.data.examples import Example
from loraqa.data.load import load_examples
from loraqa.io import log, write_json_atomic, write_jsonl_atomic

CHECKPOINTS = "checkpoints"


def load_questions(config: Config, split: str) -> list[Example]:
    """The run's ``train`` or ``validation`` questions: ``--train-file`` / ``--eval-file`` (else the
    hub dataset's split), the first ``--max-train-examples`` / ``--max-eval-examples``; with
    ``--document-level``, the evaluation questions each against its whole document."""
    path, limit = ((config.train_file, config.max_train_examples) if split == "train"
                   else (config.eval_file, config.max_eval_examples))
    whole = split != "train" and config.document_level  # each question against its whole document
    examples = load_examples(path, split, None if whole else limit, dataset=config.dataset, columns=config.columns,
                             allow_unanswerable=config.allow_unanswerable)
    return document_level(examples)[:limit] if whole else examples


def claim_output_dir(config: Config) -> Path:
    """The run folder, refusing one that holds a run with other settings (it would be mixed up)."""
    out = Path(config.output_dir)
    saved = out / "config.yaml"
    if saved.is_file():
        previous = yaml.safe_load(saved.read_text()) or {}
        changed = sorted(k for k, v in config.to_dict().items() if previous.get(k, v) != v)
        refused = [k for k in changed if k not in RESUME_MAY_CHANGE]
        if refused:
            raise ValueError(f"--output-dir {out} holds a run with other settings ({', '.join(refused)}); "
                             "choose another folder, or remove it")
        for k in changed:
            log(f"{out}: {k} was {previous[k]!r}, now {getattr(config, k)!r} (a resumed run may change it)")
    elif out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--output-dir {out} is not empty and holds no loraqa run; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, saved)
    return out


def last_step(steps: list[dict]) -> int:
    """The optimizer step of the loss curve's newest point (0 before the first)."""
    return steps[-1]["step"] if steps else 0


def write_curves(out: Path, history: list[dict], steps: list[dict]) -> None:
    write_jsonl_atomic(out / "history.jsonl", history)
    write_jsonl_atomic(out / "steps.jsonl", steps)


def write_results(out: Path, predictions: dict[str, str], metrics: dict, na_probs: dict[str, float]) -> None:
    """predictions.json, metrics.json, and na_probs.json where there are unanswerable questions (the
    official v2.0 script's --na-prob-file); logs the scores."""
    write_json_atomic(out / "predictions.json", predictions)
    v2 = metrics.get("squad_v2")
    if v2:
        write_json_atomic(out / "na_probs.json", na_probs)
    write_json_atomic(out / "metrics.json", metrics)
    line = f"exact match {metrics['exact_match']:.2f}, F1 {metrics['f1']:.2f} on {metrics['n_questions']} questions"
    if v2:
        line += (f" (v2.0: HasAns F1 {v2.get('HasAns_f1', 0):.2f}, NoAns exact {v2.get('NoAns_exact', 0):.2f}; "
                 f"best F1 {v2['best_f1']:.2f} at no-answer threshold {v2['best_f1_thresh']:.3f})")
    log(f"{line}; run folder {out}")
