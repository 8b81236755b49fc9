"""The train job (``loraqa train``): load the model and the questions, train (``training.loop``),
save the adapter, answer the evaluation questions, and write the run folder (``runs``).

Rerun with the same settings and output folder, it resumes from the newest checkpoint. Under
``torchrun`` / ``accelerate launch`` every process trains on its share; the main one writes files.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import torch

from loraqa.config import Config
from loraqa.data.documents import document_windows
from loraqa.data.examples import Example
from loraqa.data.features import build_eval_features, build_train_features
from loraqa.inference.documents import rank, window_size
from loraqa.inference.evaluation import evaluate
from loraqa.inference.paths import check_support
from loraqa.inference.settings import DecodeSettings
from loraqa.io import log, save_dir_atomic, write_json_atomic
from loraqa.model.load import load_base, load_model, resolve_max_length
from loraqa.model.lora import ADAPTER_SETTINGS, load_adapter, merge_for_answering, parameter_counts, prepare_model
from loraqa.model.precision import apply_precision, resolve_precision
from loraqa.model.recompute import enable_gradient_checkpointing
from loraqa.model.weights import RECORD as WEIGHTS_RECORD
from loraqa.model.weights import weights_record
from loraqa.model.span import build_span_features
from loraqa.runs import CHECKPOINTS, claim_output_dir, last_step, load_questions, write_curves, write_results
from loraqa.runtime import allocator, peak_memory_mb
from loraqa.training.checkpoint import resumed_precision
from loraqa.training.loop import train
from loraqa.training.loss import train_step_probe
from loraqa.training.processes import Processes
from loraqa.training.tracking import Tracking


def run_train(config: Config, progress: bool = True) -> dict:
    """Train with ``config``, save the adapter (or model), evaluate, and write the run folder."""
    processes = Processes.from_environment()
    if processes.world > 1:  # every process says where it stands
        log(processes.describe())
    out = claim_output_dir(config) if processes.is_main else Path(config.output_dir)
    # --report-to: only the main process sends; elsewhere every call is a no-op
    tracking = Tracking(config.report_to if processes.is_main else None, out, config.to_dict())
    processes.barrier()
    device = processes.device
    model, tokenizer, base_total = load_base(config)
    weights = weights_record(config)  # the weights this run uses: in its folder and beside its adapter
    if processes.is_main:
        write_json_atomic(out / WEIGHTS_RECORD, weights)
    max_length = resolve_max_length(config, model, tokenizer)
    train_examples, eval_examples = load_questions(config, "train"), load_questions(config, "validation")
    features, stats, eval_loss_features = build_features(config, tokenizer, train_examples,
                                                         eval_examples[:config.eval_loss_examples], max_length,
                                                         processes)
    torch.manual_seed(config.seed)  # LoRA's A matrices and dropout
    model = prepare_model(model, config).to(device)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    malloc = allocator()  # read once: it bounds the peak as the settings do (runtime.py)
    if (config.gradient_checkpointing or config.max_batch_tokens) and device.type == "cpu" and malloc == "glibc":
        processes.log("memory: glibc's malloc fragments here and sets the peak; with jemalloc installed "
                      "(apt-get install libjemalloc2) the loraqa command runs on it: the recommended 4,000-question "
                      "run with both settings peaked at 2.04 GB there, 4.41 GB on glibc, at about the same speed "
                      "(docs/memory.md)")
    counts = parameter_counts(model, base_total)
    if config.method != "span":  # the answering path, checked while the weights are float32 (see inference.paths)
        check_support(model, build_eval_features(tokenizer, eval_examples[:64], config.template, max_length,
                                                 config.max_new_tokens)[0], tokenizer.pad_token_id,
                      config.max_new_tokens)
    precision, why = train_precision(model, config, features, tokenizer.pad_token_id, device, processes, out)
    processes.log(f"{config.method}: {counts['trainable_params']:,} trainable of {base_total:,} parameters "
                  f"({counts['trainable_percent']:.4f}%); {processes.world} process(es) on {device}, "
                  f"precision {precision} ({why}), max length {max_length}")

    history, steps = train(model, features, eval_loss_features, config, pad_id=tokenizer.pad_token_id,
                           device=device, precision=precision, processes=processes,
                           on_epoch_end=functools.partial(record_epoch, out, tracking),
                           on_step_point=tracking.log_point, progress=progress, checkpoint_dir=out / CHECKPOINTS)
    train_peak = peak_memory_mb(device)  # before the final evaluation, whose batches --eval-batch-tokens bounds
    if processes.is_main:
        write_curves(out, history, steps)  # again: a resumed, already finished run calls no on_epoch_end
        save_trained(model, tokenizer, config, max_length, out, weights)

    # answered as `loraqa evaluate` answers the saved result: its predictions, and serve's, are these
    answering, answering_why = resolve_precision(config.precision, device, answering=True)
    if answering == "fp32" and precision != "fp32" and config.method != "span":
        processes.barrier()  # the saved result is there for every process
        del model
        model = saved_for_answering(config, out, device)
    else:
        answering, answering_why = precision, why
        model = merge_for_answering(model, precision)
    predictions, na_probs, metrics = evaluate(model, tokenizer, eval_examples,
                                              DecodeSettings.from_config(config, max_length), device, answering,
                                              processes=processes, progress=progress)
    metrics.update(counts)
    metrics.update(run_record(config, history, stats, processes, malloc, (precision, why), (answering, answering_why),
                              max_length, train_peak))
    if processes.is_main:
        write_results(out, predictions, metrics, na_probs)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # complete: adapter/ or model/ holds the result
    tracking.log({"exact_match": metrics["exact_match"], "f1": metrics["f1"]}, step=last_step(steps))
    tracking.finish()
    processes.close()
    return metrics


def run_record(config: Config, history: list[dict], stats, processes: Processes, malloc: str,
               trained: tuple[str, str], answered: tuple[str, str], max_length: int, train_peak: float) -> dict:
    """What a run's metrics.json says of how it ran: time and tokens (optimizer steps only, summed
    over resumes), what was windowed or dropped, memory, processes and precisions."""
    train_seconds = sum(r["train_seconds"] for r in history)
    train_tokens = sum(r["train_tokens"] for r in history)
    device = processes.device
    return {
        "method": config.method, "train_seconds": train_seconds, "train_questions": stats.examples,
        "train_windowed": stats.windowed, "train_dropped": stats.dropped,
        "train_tokens": train_tokens, "train_tokens_per_second": train_tokens / max(train_seconds, 1e-9),
        "gradient_checkpointing": config.gradient_checkpointing, "max_batch_tokens": config.max_batch_tokens,
        "allocator": malloc, "largest_batch_tokens": max(r.get("largest_batch_tokens", 0) for r in history),
        "processes": processes.world, "device": str(device), "precision": trained[0], "precision_reason": trained[1],
        "answer_precision": answered[0], "answer_precision_reason": answered[1],
        "max_length": max_length, "train_peak_memory_mb": train_peak, "peak_memory_mb": peak_memory_mb(device)}


def build_features(config: Config, tokenizer, train_examples: list[Example], eval_loss_examples: list[Example],
                   max_length: int, processes: Processes):
    """(training features, their counts, eval-loss features): prompt + answer with answer-only
    labels, or a span head's windows; what was windowed or dropped is logged."""
    if config.method == "span":  # windows of the context, start/end labels
        (features, stats), (eval_features, eval_stats) = (
            build_span_features(tokenizer, examples, max_length, config.doc_stride)
            for examples in (train_examples, eval_loss_examples))
    else:
        if config.negative_windows:  # read as documents are: windows holding the answer, and windows that do not
            train_examples = windows_for_training(config, tokenizer, train_examples, max_length, processes)
        (features, stats), (eval_features, eval_stats) = (
            build_train_features(tokenizer, examples, config.template, max_length, no_answer_text=config.no_answer_text)
            for examples in (train_examples, eval_loss_examples))
    for kind, counted in (("train", stats), ("eval loss", eval_stats)):
        processes.log(f"{kind}: {counted.examples} questions, {counted.windowed} with the context windowed to "
                      f"fit, {counted.dropped} dropped (too long to fit at all)")
    if not features:
        raise ValueError(f"no training example fits --max-length {max_length}")
    return features, stats, eval_features


def windows_for_training(config: Config, tokenizer, examples: list[Example], max_length: int,
                         processes: Processes) -> list[Example]:
    """Each question in a window of its whole document that holds its answer, and in
    ``--negative-windows`` windows that do not (the ones BM25 ranks first), as unanswerable examples;
    windows cut as answering cuts them (``inference.documents``)."""
    settings = DecodeSettings.from_config(config, max_length)
    size = window_size(tokenizer, settings)
    if size is None:
        raise ValueError(f"--negative-windows: --max-length {max_length} leaves no room for a window's passage")
    windows = document_windows(tokenizer, examples, size, min(config.doc_stride, size // 2), config.negative_windows,
                               lambda question, texts: rank([question], texts, config.negative_windows)[0])
    processes.log(f"train: {len(examples)} questions read as documents are, in windows of at most {size} tokens: "
                  f"{sum(ex.answerable for ex in windows)} answerable, {sum(not ex.answerable for ex in windows)} "
                  "windows that do not hold the answer")
    return windows


def saved_for_answering(config: Config, out: Path, device: torch.device):
    """The run's saved result (the base + adapter/, or model/), in fp32, merged: what ``loraqa
    evaluate`` answers with, for a run that trained in another precision."""
    if config.method == "full":
        return load_model(str(out / "model")).to(device)
    base, _, _ = load_base(config)
    return merge_for_answering(load_adapter(base, out / "adapter", config).to(device), "fp32")


def train_precision(model, config: Config, features, pad_id: int, device: torch.device, processes: Processes,
                    out: Path) -> tuple[str, str]:
    """(precision, why): ``--precision``, probed at the run's shapes where ``auto`` needs it; a
    resumed run keeps the precision its checkpoints were trained in."""
    resumed = resumed_precision(out / CHECKPOINTS)
    precision, why = apply_precision(model, resumed or config.precision, device, processes=processes,
                                     step=train_step_probe(model, features, config.batch_size, pad_id, device))
    if resumed:
        why = "a resumed run keeps the precision its checkpoints were trained in"
    return precision, why


def record_epoch(out: Path, tracking: Tracking, history: list[dict], steps: list[dict]) -> None:
    """At each epoch's end (main process): the curves to the run folder, a log line, the tracker."""
    write_curves(out, history, steps)
    row = history[-1]
    eval_loss = "not scored" if row["eval_loss"] is None else f"{row['eval_loss']:.4f}"
    log(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, eval loss {eval_loss}")
    tracking.log({"eval_loss": row["eval_loss"], "epoch_train_loss": row["train_loss"], "epoch": row["epoch"]},
                 step=last_step(steps))


def save_trained(model, tokenizer, config: Config, max_length: int, out: Path, weights: dict) -> None:
    """adapter/ (LoRA, with the prompt settings and the base weights it was trained on beside it)
    or model/ + tokenizer (full)."""
    settings = {"template": config.template, "max_length": max_length, "no_answer_text": config.no_answer_text,
                "method": config.method, "doc_stride": config.doc_stride, "window_tokens": config.window_tokens,
                "windows_per_question": config.windows_per_question, "model": config.model, "init": config.init, "seed": config.seed, "base_weights": weights}

    def write(folder: Path) -> None:
        if config.method == "full":
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        else:  # LoRA leaves the embeddings alone: skip PEFT's check of the base model's vocabulary
            model.save_pretrained(folder, save_embedding_layers=False)
        (folder / ADAPTER_SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")

    save_dir_atomic(out / ("model" if config.method == "full" else "adapter"), write)
