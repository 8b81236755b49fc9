"""Extractive QA with a span head (``--method span``): the causal LM's decoder with a linear head
that scores each token as the answer's start and end (transformers' ``*ForQuestionAnswering``),
LoRA on the decoder and the head trained in full (PEFT's ``QUESTION_ANS`` task).

The question comes first, ``Question: ...\\nContext: ...``: a causal model's token sees only what
precedes it, so each context token must come after the question to be scored for it. A context
longer than the budget is read in overlapping windows (``doc_stride`` tokens shared by neighbours);
a window whose context does not hold the whole answer (or any window of an unanswerable question)
is labelled with position 0, the usual "no answer" position. Predictions take the best start/end
pair over every window (``n_best`` starts x ``n_best`` ends, end >= start, at most
``max_answer_tokens``), cut from the original context by the tokens' character offsets; with
unanswerable questions, "no answer" wins when position 0's score beats the best span.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from loraqa import IGNORE_INDEX
from loraqa.data.examples import Example
from loraqa.data.features import FeatureStats
from loraqa.model.precision import autocast

SPAN_PREFIX = "Question: {question}\nContext:"


@dataclass(frozen=True)
class SpanFeature:
    id: str                             # the question's id; its windows share it
    input_ids: list[int]                # question prefix + one window of the context
    offsets: tuple[tuple[int, int], ...]  # (start, end) characters in the context of each window token
    first: int                          # position of the window's first context token
    start: int = 0                      # answer start / end positions; 0 = not in this window
    end: int = 0


def _context_tokens(tokenizer, context: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The context's tokens as they follow "Context:" (after a space), with offsets into ``context``."""
    enc = tokenizer(" " + context, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [(max(a - 1, 0), max(b - 1, 0)) for a, b in enc["offset_mapping"]]
    return enc["input_ids"], offsets


def _label(offsets: list[tuple[int, int]], lo: int, hi: int, answer: tuple[int, int] | None) -> tuple[int, int]:
    """Token positions (within offsets[lo:hi]) of the answer's first and last character, or None."""
    if answer is None:
        return None
    s, e = answer
    starts = [i for i in range(lo, hi) if offsets[i][0] <= s < offsets[i][1]]
    ends = [i for i in range(lo, hi) if offsets[i][0] < e <= offsets[i][1]]
    return (starts[0], ends[-1]) if starts and ends else None


def build_span_features(tokenizer, examples: list[Example], max_length: int,
                        doc_stride: int = 128) -> tuple[list[SpanFeature], FeatureStats]:
    """One feature per window of each example's context (``stats.windowed`` counts examples read in
    more than one window; ``dropped`` those whose question alone fills the budget)."""
    stats = FeatureStats(examples=len(examples))
    features = []
    for ex in examples:
        prefix = tokenizer(SPAN_PREFIX.format(question=ex.question), add_special_tokens=False)["input_ids"]
        room = max_length - len(prefix)
        if room < 8:
            stats.count(None)
            continue
        ids, offsets = _context_tokens(tokenizer, ex.context)
        answer = (ex.answer_starts[0], ex.answer_starts[0] + len(ex.answer)) if ex.answerable else None
        step = max(room - min(doc_stride, room // 2), 1)
        windows = list(range(0, max(len(ids) - room, 0) + step, step)) if len(ids) > room else [0]
        windows = [w for w in windows if w < len(ids)] or [0]
        stats.windowed += len(windows) > 1
        for lo in windows:
            hi = min(lo + room, len(ids))
            found = _label(offsets, lo, hi, answer)
            start, end = (0, 0) if found is None else (len(prefix) + found[0] - lo, len(prefix) + found[1] - lo)
            features.append(SpanFeature(ex.id, prefix + ids[lo:hi], tuple(offsets[lo:hi]), len(prefix), start, end))
            if hi == len(ids):
                break
    return features, stats


def collate_span(features: list[SpanFeature], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded windows with their start/end labels."""
    width = max(len(f.input_ids) for f in features)
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        input_ids[i, :len(f.input_ids)] = torch.tensor(f.input_ids)
        attention_mask[i, :len(f.input_ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "start_positions": torch.tensor([f.start for f in features]),
            "end_positions": torch.tensor([f.end for f in features])}


def span_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed (start + end) / 2 cross-entropy over the batch's windows (labels -100 add nothing)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    pad = batch["attention_mask"] == 0
    start = out.start_logits.float().masked_fill(pad, -1e4)
    end = out.end_logits.float().masked_fill(pad, -1e4)
    return (F.cross_entropy(start, batch["start_positions"], ignore_index=IGNORE_INDEX, reduction="sum")
            + F.cross_entropy(end, batch["end_positions"], ignore_index=IGNORE_INDEX, reduction="sum")) / 2


def span_windows(batch: dict[str, torch.Tensor]) -> int:
    """How many windows of ``batch`` carry a label (what the loss is a sum over)."""
    return int((batch["start_positions"] != IGNORE_INDEX).sum())


def best_span(start: list[float], end: list[float], f: SpanFeature, n_best: int,
              max_answer_tokens: int) -> tuple[float, int, int] | None:
    """(score, first char, end char) of the window's best answer span, or None."""
    positions = range(f.first, len(f.input_ids))
    starts = sorted(positions, key=lambda i: start[i], reverse=True)[:n_best]
    ends = sorted(positions, key=lambda i: end[i], reverse=True)[:n_best]
    best = None
    for s in starts:
        for e in ends:
            if s <= e < s + max_answer_tokens and (best is None or start[s] + end[e] > best[0]):
                best = (start[s] + end[e], f.offsets[s - f.first][0], f.offsets[e - f.first][1])
    return best


def answer_spans(model, tokenizer, examples: list[Example], *, max_length: int, doc_stride: int, batch_size: int,
                 device: torch.device, precision: str, allow_no_answer: bool, max_answer_tokens: int,
                 na_probs: dict[str, float] | None = None, progress: bool = False) -> tuple[dict[str, str], FeatureStats]:
    """Windows for ``examples``, then :func:`predict_spans` in ``precision``: (answers, window stats)."""
    features, stats = build_span_features(tokenizer, examples, max_length, doc_stride)
    with autocast(device, precision):
        answers = predict_spans(model, tokenizer, examples, features, batch_size, device, allow_no_answer=allow_no_answer,
                                max_answer_tokens=max_answer_tokens, na_probs=na_probs, progress=progress)
    return answers, stats


@torch.inference_mode()
def predict_spans(model, tokenizer, examples: list[Example], features: list[SpanFeature], batch_size: int,
                  device: torch.device, *, allow_no_answer: bool, n_best: int = 20, max_answer_tokens: int = 30,
                  na_probs: dict[str, float] | None = None, progress: bool = False) -> dict[str, str]:
    """{question id: answer}: each question's best span over its windows ("" when position 0 wins
    and ``allow_no_answer``); ``na_probs`` gets sigmoid(no-answer score - best span score)."""
    model.eval()
    best: dict[str, tuple[float, int, int]] = {}
    null: dict[str, float] = {}
    order = sorted(range(len(features)), key=lambda i: len(features[i].input_ids))
    bar = tqdm(total=len(features), desc="spans", unit="window", disable=not progress)
    for b in range(0, len(order), batch_size):
        chunk = [features[i] for i in order[b:b + batch_size]]
        batch = collate_span(chunk, tokenizer.pad_token_id)
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        for f, start, end in zip(chunk, out.start_logits.float().tolist(), out.end_logits.float().tolist()):
            null[f.id] = min(null.get(f.id, math.inf), start[0] + end[0])
            found = best_span(start, end, f, n_best, max_answer_tokens)
            if found and (f.id not in best or found[0] > best[f.id][0]):
                best[f.id] = found
        bar.update(len(chunk))
    bar.close()
    contexts = {ex.id: ex.context for ex in examples}
    predictions = {}
    for qid, (score, lo, hi) in best.items():
        no_answer = allow_no_answer and null[qid] > score
        predictions[qid] = "" if no_answer else contexts[qid][lo:hi].strip()
        if na_probs is not None:
            na_probs[qid] = 1 / (1 + math.exp(max(min(score - null[qid], 50), -50)))
    return predictions
