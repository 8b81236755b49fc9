"""Use a result: merge an adapter into a plain model, and answer questions with a model (+ adapter)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraqa.config import Config
from loraqa.data import DataError, Example
from loraqa.features import Feature, FeatureStats, build_eval_features
from loraqa.generate import predict
from loraqa.lora import load_adapter
from loraqa.span import answer_spans
from loraqa.distributed import Processes
from loraqa.pipeline import ADAPTER_SETTINGS, inference_precision, load_base, log, resolve_max_length, save_dir_atomic


def merge(config: Config, adapter: str, output_dir: str) -> Path:
    """Base model + adapter -> a plain transformers model folder (safetensors + tokenizer)."""
    model, tokenizer, _ = load_base(config)
    merged = load_adapter(model, adapter).merge_and_unload()
    target = Path(output_dir)
    settings = Path(adapter) / ADAPTER_SETTINGS

    def write(folder: Path) -> None:
        merged.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        if settings.is_file():  # keep the prompt settings with the merged model
            (folder / ADAPTER_SETTINGS).write_text(settings.read_text())

    save_dir_atomic(target, write)
    log(f"merged {adapter} into {config.model}: {target}")
    return target


def read_questions(path: str) -> list[Example]:
    """JSONL, one {"context": ..., "question": ..., "id"?: ...} per line."""
    examples = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
        for key in ("context", "question"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise DataError(f"{path}: line {n}: field '{key}' must be a non-empty string")
        examples.append(Example(str(row.get("id", n)), "", row["context"], row["question"], ()))
    if not examples:
        raise DataError(f"{path}: no questions")
    return examples


@dataclass
class Answerer:
    """A model loaded to answer questions: what ``ask`` and ``loraqa serve`` share (one decoder)."""
    model: Any
    tokenizer: Any
    config: Config
    max_length: int
    device: torch.device
    precision: str

    def features(self, examples: list[Example]) -> tuple[list[Feature], FeatureStats]:
        """Prompts within the token budget; contexts cut from the end where too long (counted)."""
        return build_eval_features(self.tokenizer, examples, self.config.template, self.max_length,
                                   self.config.max_new_tokens)

    def decode(self, features: list[Feature], progress: bool = False,
               contexts: dict[str, str] | None = None) -> dict[str, str]:
        """{feature id: answer}; questions on the same passage share its prefill. With
        ``config.constrain_to_context``, ``contexts`` ({feature id: passage}) hold answers to spans."""
        return predict(self.model, self.tokenizer, features, self.config.eval_batch_size, self.config.max_new_tokens,
                       self.device, self.precision, progress, self.config.eval_batch_tokens, self.config.no_answer_text,
                       contexts=contexts if self.config.constrain_to_context else None,
                       na_thresh=self.config.na_prob_thresh)


def load_answerer(config: Config, adapter: str | None, probe_examples: list[Example]) -> Answerer:
    """Model (+ adapter) on this machine's device, in the precision ``inference_precision`` picks
    (where ``auto`` needs a probe, it prefills a batch of ``probe_examples``' prompts)."""
    device = Processes.single().device
    model, tokenizer, _ = load_base(config)
    max_length = resolve_max_length(config, model, tokenizer)
    if adapter:
        model = load_adapter(model, adapter)
    model.to(device)
    precision, _ = inference_precision(model, tokenizer, config, device, probe_examples, max_length)
    return Answerer(model, tokenizer, config, max_length, device, precision)


def ask(config: Config, adapter: str | None, examples: list[Example], progress: bool = False) -> dict[str, str]:
    """{id: answer} for each example, decoded in batches."""
    answerer = load_answerer(config, adapter, examples)
    if config.method == "span":
        answers, _ = answer_spans(answerer.model, answerer.tokenizer, examples, max_length=answerer.max_length,
                                  doc_stride=config.doc_stride, batch_size=config.eval_batch_size,
                                  device=answerer.device, precision=answerer.precision,
                                  allow_no_answer=config.allow_unanswerable, max_answer_tokens=config.max_new_tokens,
                                  progress=progress)
        return {ex.id: answers.get(ex.id, "") for ex in examples}
    features, stats = answerer.features(examples)
    if stats.windowed or stats.dropped:
        log(f"{stats.windowed} contexts cut to fit {answerer.max_length} tokens; "
            f"{stats.dropped} questions too long to answer")
    answers = answerer.decode(features, progress, {ex.id: ex.context for ex in examples})
    return {ex.id: answers.get(ex.id, "") for ex in examples}
