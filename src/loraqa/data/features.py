"""Tokenise examples, window long contexts, build the answer-only label mask, collate batches.

Every example that had its context cut (``windowed``) or could not fit at all (``dropped``) is
counted in :class:`FeatureStats`; nothing is lost silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraqa import IGNORE_INDEX
from loraqa.data.examples import Example
from loraqa.data.prompt import context_span, format_target, prompt_of


@dataclass(frozen=True)
class Feature:
    id: str
    input_ids: list[int]  # prompt tokens, then (training only) target tokens ending in EOS
    n_prompt: int         # how many of input_ids belong to the prompt
    # a document window's question: how many prompt tokens are its window's part, the same for every question
    # (``Context: <window>\nQuestion:``): the part a batch may share and a ``PassageStore`` keep
    n_context: int | None = None
    # a document window's question: (its question's key, the window's rank among those it is read in, best
    # first); the rows of one question are rivals, one answer chosen among them (``inference.rivals``)
    window_of: tuple[str, int] | None = None


@dataclass
class FeatureStats:
    examples: int = 0
    windowed: int = 0   # context cut to fit the token budget
    dropped: int = 0    # could not fit at all (answer or question too long for the budget)

    def count(self, encoded: tuple[list[int], bool] | None) -> list[int] | None:
        """Record one ``encode_prompt`` result; returns the prompt ids, or None when dropped."""
        if encoded is None:
            self.dropped += 1
            return None
        self.windowed += encoded[1]
        return encoded[0]


def _overlapping(offsets: list[tuple[int, int]], lo: int, hi: int) -> list[int]:
    """Indices of real (non-special) tokens whose character span overlaps [lo, hi)."""
    return [i for i, (s, e) in enumerate(offsets) if e > s and e > lo and s < hi]


def encode_prompt(tokenizer, example: Example, template: str, budget: int,
                  keep: tuple[int, int] | None = None) -> tuple[list[int], bool] | None:
    """Prompt token ids within ``budget`` tokens, cutting only the context.

    The prompt is tokenised whole (so its tokens are the ones the model sees at inference), then
    context tokens are removed: around ``keep`` (the answer's character span in the context) when
    given, else from the end. Returns (ids, windowed), or None when even the kept part cannot fit.
    """
    text = prompt_of(example, template)
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if len(ids) <= budget:
        return ids, False
    c_start, c_end = context_span(template, example.context, example.question)
    ctx = _overlapping(offsets, c_start, c_end)
    c0, c1 = ctx[0], ctx[-1] + 1
    room = budget - (len(ids) - (c1 - c0))  # context tokens we may keep
    if room <= 0:
        return None
    if keep is None:
        start = c0
    else:
        span = _overlapping(offsets, c_start + keep[0], c_start + keep[1])
        a0, a1 = span[0], span[-1] + 1
        if a1 - a0 > room:
            return None
        # centre the answer in the kept window, clamped to the context
        start = min(max(a0 - (room - (a1 - a0)) // 2, c0), c1 - room)
    return ids[:c0] + ids[start:start + room] + ids[c1:], True


def target_ids(tokenizer, answer: str) -> list[int]:
    """' answer' + EOS; an empty answer (no answer) is EOS alone, not ' ' + EOS."""
    if not answer.strip():
        return [tokenizer.eos_token_id]
    return tokenizer(format_target(answer), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def no_answer_token(tokenizer, no_answer_text: str = "") -> int:
    """The first token of the no-answer target: EOS, or the phrase's first token."""
    return target_ids(tokenizer, no_answer_text)[0]


def build_train_features(tokenizer, examples: list[Example], template: str, max_length: int,
                         no_answer_text: str = "") -> tuple[list[Feature], FeatureStats]:
    """Prompt + ' answer' + EOS per example (first gold answer), at most ``max_length`` tokens.

    An unanswerable example's target is ``no_answer_text`` ('' : EOS right after the prompt); it
    has no answer span to keep, so its context is cut from the end, as at evaluation.
    """
    stats = FeatureStats(examples=len(examples))
    features = []
    for ex in examples:
        if not ex.answerable:
            target = target_ids(tokenizer, no_answer_text)
            prompt = stats.count(encode_prompt(tokenizer, ex, template, max_length - len(target)))
            if prompt is not None:
                features.append(Feature(ex.id, prompt + target, len(prompt)))
            continue
        target = target_ids(tokenizer, ex.answer)
        start = ex.answer_starts[0]
        prompt = stats.count(encode_prompt(tokenizer, ex, template, max_length - len(target),
                                           keep=(start, start + len(ex.answer))))
        if prompt is not None:
            features.append(Feature(ex.id, prompt + target, len(prompt)))
    return features, stats


def build_eval_features(tokenizer, examples: list[Example], template: str, max_length: int,
                        max_new_tokens: int) -> tuple[list[Feature], FeatureStats]:
    """Prompts only, leaving room for ``max_new_tokens`` generated tokens within ``max_length``."""
    stats = FeatureStats(examples=len(examples))
    features = []
    for ex in examples:
        prompt = stats.count(encode_prompt(tokenizer, ex, template, max_length - max_new_tokens))
        if prompt is not None:
            features.append(Feature(ex.id, prompt, len(prompt)))
    return features, stats


def collate_train(features: list[Feature], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch whose labels keep only the target (answer + EOS).

    Labels are set by *position*, never by comparing ids with ``pad_id``: GPT-2's pad token is
    its EOS, and the EOS that ends each answer must stay a label. Example (P prompt, A answer,
    E eos, _ pad; the model shifts labels itself):

        input_ids       P  P  P  A  A  E  _  _
        attention_mask  1  1  1  1  1  1  0  0
        labels         -100 -100 -100 A A E -100 -100
    """
    width = max(len(f.input_ids) for f in features)
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f.input_ids)
        input_ids[i, :n] = torch.tensor(f.input_ids)
        attention_mask[i, :n] = 1
        labels[i, f.n_prompt:n] = input_ids[i, f.n_prompt:n]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def median_batch(features: list, batch_size: int, pad_id: int, collate=None) -> dict[str, torch.Tensor]:
    """``collate`` (default ``collate_train``) of ``batch_size`` features of median length: a typical
    batch, for probes."""
    order = sorted(features, key=lambda f: len(f.input_ids))
    middle = max(0, len(order) // 2 - batch_size // 2)
    return (collate or collate_train)(order[middle:middle + batch_size], pad_id)
