"""The jobs behind the commands: load, train, evaluate, and write the run folder.

A run folder holds plain files that need no torch to read:
    config.yaml        resolved settings          history.jsonl   one row per epoch
    steps.jsonl        the loss curve, a point every 10 optimizer steps
    predictions.json   {question id: answer}      metrics.json    scores, sizes, times, counts
    adapter/           PEFT adapter (LoRA)   or   model/          full model + tokenizer (full)
    tensorboard/       event files, with --report-to tensorboard
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import yaml

from loraqa.config import RESUME_MAY_CHANGE, Config, save_config
from loraqa.data import load_examples
from loraqa.distributed import Processes
from loraqa.evaluate import evaluate
from loraqa.features import build_eval_features, build_train_features
from loraqa.io import write_json_atomic, write_jsonl_atomic
from loraqa.lora import load_adapter, parameter_counts, prepare_model
from loraqa.checkpoint import resumed_precision
from loraqa.generate import probe_step as prefill_step
from loraqa.model import context_window, count_parameters, load_model, load_tokenizer
from loraqa.precision import apply_precision
from loraqa.prompt import format_prompt
from loraqa.recompute import enable_gradient_checkpointing
from loraqa.runtime import allocator
from loraqa.span import build_span_features
from loraqa.tracking import Tracking
from loraqa.train import probe_step, train

ADAPTER_SETTINGS = "loraqa.json"  # beside the adapter: how prompts were built for it
CHECKPOINTS = "checkpoints"


def log(message: str) -> None:
    print(f"[loraqa] {message}", file=sys.stderr, flush=True)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory on CUDA; else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def resolve_max_length(config: Config, model, tokenizer) -> int:
    """--max-length, capped by the model's window (the window when not given), and long enough
    for the template alone plus a generated answer."""
    window = context_window(model)
    if config.max_length is None and window is None:
        raise ValueError(f"model {config.model} states no context window; pass --max-length")
    if config.max_length is not None and window is not None and config.max_length > window:
        raise ValueError(f"--max-length {config.max_length} exceeds the model's window of {window} tokens")
    max_length = config.max_length or window
    bare = len(tokenizer(format_prompt(config.template, "", ""))["input_ids"])  # no context, no question
    if max_length < bare + 1 + config.max_new_tokens:
        raise ValueError(f"--max-length {max_length} is too small: the template alone takes {bare} tokens and "
                         f"answers up to --max-new-tokens {config.max_new_tokens}; raise it or lower --max-new-tokens")
    return max_length


def load_base(config: Config):
    """(model, tokenizer, base parameter count) for the settings' model and tokenizer."""
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    model = load_model(config.model, config.init, config.seed, config.model_dropout, span_head=config.method == "span")
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}")
    return model, tokenizer, count_parameters(model)[1]


def config_examples(config: Config, path: str | None, split: str, limit: int | None):
    """``load_examples`` with the settings' data options (hub dataset, column names, unanswerable)."""
    return load_examples(path, split, limit, dataset=config.dataset, columns=config.columns,
                         allow_unanswerable=config.allow_unanswerable)


def inference_precision(model, tokenizer, config: Config, device: torch.device, examples, max_length: int):
    """(precision, why) for answering ``examples``; every linear weight is stored in it (nothing
    trains). A probe, where ``auto`` needs one, prefills a batch of their prompts."""
    features, _ = build_eval_features(tokenizer, examples[:64], config.template, max_length, config.max_new_tokens)
    step = prefill_step(model, features, config.eval_batch_size, tokenizer.pad_token_id, device) if features else None
    precision, why = apply_precision(model, config.precision, device, step, everything=True)
    log(f"precision {precision} ({why})")
    return precision, why


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


def run_train(config: Config, progress: bool = True) -> dict:
    """Train with ``config``, save the adapter (or model), evaluate, and write the run folder.

    Rerun with the same settings and output dir, it resumes from the newest checkpoint. Under
    ``torchrun``/``accelerate launch`` every process trains on its share; the main one writes files.
    """
    processes = Processes.from_environment()
    out = claim_output_dir(config) if processes.is_main else Path(config.output_dir)
    # --report-to: only the main process sends; elsewhere every call is a no-op
    tracking = Tracking(config.report_to if processes.is_main else None, out, config.to_dict())
    processes.barrier()
    device = processes.device
    model, tokenizer, base_total = load_base(config)
    max_length = resolve_max_length(config, model, tokenizer)
    train_examples = config_examples(config, config.train_file, "train", config.max_train_examples)
    eval_examples = config_examples(config, config.eval_file, "validation", config.max_eval_examples)
    if config.method == "span":  # windows of the context, start/end labels
        train_features, train_stats = build_span_features(tokenizer, train_examples, max_length, config.doc_stride)
        eval_loss_features, eval_loss_stats = build_span_features(
            tokenizer, eval_examples[:config.eval_loss_examples], max_length, config.doc_stride)
    else:
        train_features, train_stats = build_train_features(tokenizer, train_examples, config.template, max_length,
                                                           no_answer_text=config.no_answer_text)
        eval_loss_features, eval_loss_stats = build_train_features(
            tokenizer, eval_examples[:config.eval_loss_examples], config.template, max_length,
            no_answer_text=config.no_answer_text)
    if processes.is_main:
        _report_features("train", train_stats)
        _report_features("eval loss", eval_loss_stats)
    if not train_features:
        raise ValueError(f"no training example fits --max-length {max_length}")

    torch.manual_seed(config.seed)  # LoRA's A matrices and dropout
    model = prepare_model(model, config).to(device)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    malloc = allocator()  # read once: it bounds the peak as the settings do (runtime.py)
    if (config.gradient_checkpointing or config.max_batch_tokens) and device.type == "cpu" and malloc == "glibc":
        processes.log("memory: glibc's malloc fragments here and sets the peak; with jemalloc installed "
                      "(apt-get install libjemalloc2) the loraqa command runs on it: the same steps peaked at half, "
                      "at about the same speed (docs/memory.md)")
    counts = parameter_counts(model, base_total)
    resumed = resumed_precision(out / CHECKPOINTS)
    precision, why = apply_precision(model, resumed or config.precision, device, processes=processes,
                                     step=probe_step(model, train_features, config.batch_size, tokenizer.pad_token_id, device))
    if resumed:
        why = "a resumed run keeps the precision its checkpoints were trained in"
    processes.log(f"{config.method}: {counts['trainable_params']:,} trainable of {base_total:,} parameters "
                  f"({counts['trainable_percent']:.4f}%); {processes.world} process(es) on {device}, "
                  f"precision {precision} ({why}), max length {max_length}")

    def on_epoch_end(history: list[dict], steps: list[dict]) -> None:
        write_curves(out, history, steps)
        row = history[-1]
        eval_loss = "not scored" if row["eval_loss"] is None else f"{row['eval_loss']:.4f}"
        log(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, eval loss {eval_loss}")
        tracking.log({"eval_loss": row["eval_loss"], "epoch_train_loss": row["train_loss"], "epoch": row["epoch"]},
                     step=last_step(steps))

    history, steps = train(model, train_features, eval_loss_features, config, pad_id=tokenizer.pad_token_id,
                    device=device, precision=precision, processes=processes, on_epoch_end=on_epoch_end,
                    on_step_point=tracking.log_point, progress=progress, checkpoint_dir=out / CHECKPOINTS)
    train_seconds = sum(r["train_seconds"] for r in history)  # optimizer steps only, summed over resumes
    train_peak = peak_memory_mb(device)  # before the final evaluation, whose batches --eval-batch-tokens bounds
    if processes.is_main:
        write_curves(out, history, steps)  # again: a resumed, already finished run calls no on_epoch_end
        save_trained(model, tokenizer, config, max_length, out)

    na_probs: dict[str, float] = {}
    predictions, metrics = evaluate(
        model, tokenizer, eval_examples, template=config.template, max_length=max_length,
        max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size, device=device,
        precision=precision, progress=progress, processes=processes, batch_tokens=config.eval_batch_tokens,
        no_answer_text=config.no_answer_text, na_probs=na_probs, constrain_to_context=config.constrain_to_context,
        method=config.method, doc_stride=config.doc_stride, na_prob_thresh=config.na_prob_thresh)
    metrics.update(counts)
    train_tokens = sum(r["train_tokens"] for r in history)
    metrics.update({
        "method": config.method, "train_seconds": train_seconds, "train_questions": train_stats.examples,
        "train_windowed": train_stats.windowed, "train_dropped": train_stats.dropped,
        "train_tokens": train_tokens, "train_tokens_per_second": train_tokens / max(train_seconds, 1e-9),
        "gradient_checkpointing": config.gradient_checkpointing, "max_batch_tokens": config.max_batch_tokens,
        "allocator": malloc,
        "largest_batch_tokens": max(r.get("largest_batch_tokens", 0) for r in history),
        "processes": processes.world, "device": str(device), "precision": precision, "precision_reason": why,
        "max_length": max_length,
        "train_peak_memory_mb": train_peak, "peak_memory_mb": peak_memory_mb(device)})
    if processes.is_main:
        write_results(out, predictions, metrics, na_probs)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # complete: adapter/ or model/ holds the result
    tracking.log({"exact_match": metrics["exact_match"], "f1": metrics["f1"]}, step=last_step(steps))
    tracking.finish()
    processes.barrier()
    return metrics


def save_trained(model, tokenizer, config: Config, max_length: int, out: Path) -> None:
    """adapter/ (LoRA, with the prompt settings beside it) or model/ + tokenizer (full)."""
    settings = {"template": config.template, "max_length": max_length, "no_answer_text": config.no_answer_text,
                "method": config.method, "doc_stride": config.doc_stride,
                "model": config.model, "init": config.init, "seed": config.seed}

    def write(folder: Path) -> None:
        if config.method == "full":
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        else:  # LoRA leaves the embeddings alone: skip PEFT's check of the base model's vocabulary
            model.save_pretrained(folder, save_embedding_layers=False)
        (folder / ADAPTER_SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")

    save_dir_atomic(out / ("model" if config.method == "full" else "adapter"), write)


def adapter_settings(adapter: str | Path) -> dict:
    """The prompt settings saved beside an adapter (empty for adapters made elsewhere)."""
    path = Path(adapter) / ADAPTER_SETTINGS
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    return {k: saved[k] for k in ("template", "max_length", "no_answer_text", "method", "doc_stride") if k in saved}


def run_evaluate(config: Config, adapter: str | None = None, progress: bool = True) -> dict:
    """Evaluate the base model, or the base model plus ``adapter``; writes predictions + metrics."""
    out = claim_output_dir(config)
    device = Processes.single().device
    model, tokenizer, base_total = load_base(config)
    max_length = resolve_max_length(config, model, tokenizer)
    if adapter:
        model = load_adapter(model, adapter)
    model.to(device)
    examples = config_examples(config, config.eval_file, "validation", config.max_eval_examples)
    precision, why = inference_precision(model, tokenizer, config, device, examples, max_length)
    na_probs: dict[str, float] = {}
    predictions, metrics = evaluate(
        model, tokenizer, examples, template=config.template, max_length=max_length,
        max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size, device=device,
        precision=precision, progress=progress, batch_tokens=config.eval_batch_tokens,
        no_answer_text=config.no_answer_text, na_probs=na_probs, constrain_to_context=config.constrain_to_context,
        method=config.method, doc_stride=config.doc_stride, na_prob_thresh=config.na_prob_thresh)
    metrics.update({"method": "adapter" if adapter else "zero-shot", "adapter": str(adapter) if adapter else None,
                    "trainable_params": 0, "total_params": base_total, "trainable_percent": 0.0,
                    "device": str(device), "precision": precision, "precision_reason": why,
                    "max_length": max_length, "peak_memory_mb": peak_memory_mb(device)})
    write_results(out, predictions, metrics, na_probs)
    return metrics


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
