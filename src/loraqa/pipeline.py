"""The jobs behind the commands: load, train, evaluate, and write the run folder.

A run folder holds plain files that need no torch to read:
    config.yaml        resolved settings          history.jsonl   one row per epoch
    predictions.json   {question id: answer}      metrics.json    scores, sizes, times, counts
    adapter/           PEFT adapter (LoRA)   or   model/          full model + tokenizer (full)
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

from loraqa.config import Config, save_config
from loraqa.data import load_examples
from loraqa.evaluate import evaluate
from loraqa.features import build_train_features
from loraqa.io import write_json_atomic, write_jsonl_atomic
from loraqa.lora import load_adapter, parameter_counts, prepare_model
from loraqa.model import (context_window, count_parameters, load_model, load_tokenizer,
                          resolve_precision)
from loraqa.train import train

ADAPTER_SETTINGS = "loraqa.json"  # beside the adapter: how prompts were built for it


def log(message: str) -> None:
    print(f"[loraqa] {message}", file=sys.stderr, flush=True)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_max_length(config: Config, model) -> int:
    """--max-length, capped by the model's window; the window when not given."""
    window = context_window(model)
    if config.max_length is None:
        if window is None:
            raise ValueError(f"model {config.model} states no context window; pass --max-length")
        return window
    if window is not None and config.max_length > window:
        raise ValueError(f"--max-length {config.max_length} exceeds the model's window of {window} tokens")
    return config.max_length


def load_base(config: Config):
    """(model, tokenizer, base parameter count) for the settings' model and tokenizer."""
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    model = load_model(config.model, config.init, config.seed)
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}")
    return model, tokenizer, count_parameters(model)[1]


def save_dir_atomic(target: Path, write) -> None:
    """``write(tmp_dir)`` then swap the folder into place, so ``target`` is never half-written."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _report_features(kind: str, stats) -> None:
    log(f"{kind}: {stats.examples} questions, {stats.windowed} with the context windowed to fit, "
        f"{stats.dropped} dropped (too long to fit at all)")


def run_train(config: Config, progress: bool = True) -> dict:
    """Train with ``config``, save the adapter (or model), evaluate, and write the run folder."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    device = pick_device()
    precision = resolve_precision(config.precision, device)
    model, tokenizer, base_total = load_base(config)
    max_length = resolve_max_length(config, model)
    train_examples = load_examples(config.train_file, "train", config.max_train_examples)
    eval_examples = load_examples(config.eval_file, "validation", config.max_eval_examples)
    train_features, train_stats = build_train_features(tokenizer, train_examples, config.template, max_length)
    eval_loss_features, eval_loss_stats = build_train_features(tokenizer, eval_examples, config.template, max_length)
    _report_features("train", train_stats)
    _report_features("eval loss", eval_loss_stats)
    if not train_features:
        raise ValueError(f"no training example fits --max-length {max_length}")

    torch.manual_seed(config.seed)  # LoRA's A matrices and dropout
    model = prepare_model(model, config.method, config.r, config.lora_alpha, config.lora_dropout,
                          config.target_modules).to(device)
    counts = parameter_counts(model, base_total)
    log(f"{config.method}: {counts['trainable_params']:,} trainable of {base_total:,} parameters "
        f"({counts['trainable_percent']:.4f}%); device {device}, precision {precision}, max length {max_length}")

    history: list[dict] = []

    def on_epoch_end(row: dict) -> None:
        history.append(row)
        write_jsonl_atomic(out / "history.jsonl", history)
        log(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, eval loss {row['eval_loss']:.4f}")

    start = time.perf_counter()
    train(model, train_features, eval_loss_features, epochs=config.epochs, batch_size=config.batch_size,
          lr=config.lr, weight_decay=config.weight_decay, warmup_ratio=config.warmup_ratio,
          max_grad_norm=config.max_grad_norm, seed=config.seed, pad_id=tokenizer.pad_token_id,
          device=device, precision=precision, eval_batch_size=config.eval_batch_size,
          on_epoch_end=on_epoch_end, progress=progress)
    train_seconds = time.perf_counter() - start
    save_trained(model, tokenizer, config, max_length, out)

    predictions, metrics = evaluate(
        model, tokenizer, eval_examples, template=config.template, max_length=max_length,
        max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size, device=device,
        precision=precision, progress=progress)
    metrics.update(counts)
    metrics.update({
        "method": config.method, "train_seconds": train_seconds, "train_questions": train_stats.examples,
        "train_windowed": train_stats.windowed, "train_dropped": train_stats.dropped,
        "train_tokens": sum(r["train_tokens"] for r in history),
        "train_tokens_per_second": sum(r["train_tokens"] for r in history) / sum(r["train_seconds"] for r in history),
        "device": str(device), "precision": precision, "max_length": max_length})
    write_json_atomic(out / "predictions.json", predictions)
    write_json_atomic(out / "metrics.json", metrics)
    log(f"exact match {metrics['exact_match']:.2f}, F1 {metrics['f1']:.2f} on {metrics['n_questions']} questions; "
        f"run folder {out}")
    return metrics


def save_trained(model, tokenizer, config: Config, max_length: int, out: Path) -> None:
    """adapter/ (LoRA, with the prompt settings beside it) or model/ + tokenizer (full)."""
    settings = {"template": config.template, "max_length": max_length, "model": config.model,
                "init": config.init, "seed": config.seed}

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        if config.method == "full":
            tokenizer.save_pretrained(folder)
        (folder / ADAPTER_SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")

    save_dir_atomic(out / ("adapter" if config.method == "lora" else "model"), write)


def adapter_settings(adapter: str | Path) -> dict:
    """The prompt settings saved beside an adapter (empty for adapters made elsewhere)."""
    path = Path(adapter) / ADAPTER_SETTINGS
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    return {k: saved[k] for k in ("template", "max_length") if k in saved}


def run_evaluate(config: Config, adapter: str | None = None, progress: bool = True) -> dict:
    """Evaluate the base model, or the base model plus ``adapter``; writes predictions + metrics."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    device = pick_device()
    precision = resolve_precision(config.precision, device)
    model, tokenizer, base_total = load_base(config)
    max_length = resolve_max_length(config, model)
    if adapter:
        model = load_adapter(model, adapter)
    model.to(device)
    examples = load_examples(config.eval_file, "validation", config.max_eval_examples)
    predictions, metrics = evaluate(
        model, tokenizer, examples, template=config.template, max_length=max_length,
        max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size, device=device,
        precision=precision, progress=progress)
    metrics.update({"adapter": str(adapter) if adapter else None, "total_params": base_total,
                    "device": str(device), "precision": precision, "max_length": max_length})
    write_json_atomic(out / "predictions.json", predictions)
    write_json_atomic(out / "metrics.json", metrics)
    log(f"exact match {metrics['exact_match']:.2f}, F1 {metrics['f1']:.2f} on {metrics['n_questions']} questions; "
        f"run folder {out}")
    return metrics
