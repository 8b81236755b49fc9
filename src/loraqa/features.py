"""Tokenise examples, window long contexts, build the answer-only label mask, collate batches.

Every example that had its context cut (``windowed``) or could not fit at all (``dropped``) is
counted in :class:`FeatureStats`; nothing is lost silently.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from loraqa import IGNORE_INDEX
from loraqa.data import Example
from loraqa.prompt import context_span, format_target, prompt_of


@dataclass(frozen=True)
class Feature:
    id: str
    input_ids: list[int]  # prompt tokens, then (training only) target tokens ending in EOS
    n_prompt: int         # how many of input_ids belong to the prompt


@dataclass
class FeatureStats:
    examples: int = 0
    windowed: int = 0   # context cut to fit the token budget
    dropped: int = 0    # could not fit at all (answer or question too long for the budget)
    dropped_ids: list[str] = field(default_factory=list)

    def count(self, example_id: str, encoded: tuple[list[int], bool] | None) -> list[int] | None:
        """Record one ``encode_prompt`` result; returns the prompt ids, or None when dropped."""
        if encoded is None:
            self.dropped += 1
            self.dropped_ids.append(example_id)
            return None
        self.windowed += encoded[1]
        return encoded[0]

    def as_dict(self) -> dict[str, int]:
        return {"examples": self.examples, "windowed": self.windowed, "dropped": self.dropped}


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
    return tokenizer(format_target(answer), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def build_train_features(tokenizer, examples: list[Example], template: str,
                         max_length: int) -> tuple[list[Feature], FeatureStats]:
    """Prompt + ' answer' + EOS per example (first gold answer), at most ``max_length`` tokens."""
    stats = FeatureStats(examples=len(examples))
    features = []
    for ex in examples:
        target = target_ids(tokenizer, ex.answer)
        start = ex.answer_starts[0]
        prompt = stats.count(ex.id, encode_prompt(tokenizer, ex, template, max_length - len(target),
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
        prompt = stats.count(ex.id, encode_prompt(tokenizer, ex, template, max_length - max_new_tokens))
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


MIN_SHARED_PREFIX = 16  # tokens; shorter common prefixes are not worth a separate prefill


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_prefix_batches(features: list[Feature], batch_size: int,
                          max_tokens: int | None = None, new_tokens: int = 0) -> list[list[list[Feature]]]:
    """Batches of groups of prompts that share a prefix (in SQuAD: the passage, ~5 questions each).

    Sorting the prompts' token ids puts prompts with a common prefix next to each other; a group
    is a run of them sharing at least ``MIN_SHARED_PREFIX`` tokens (a lone prompt is a group of
    one). Groups of similar prefix length are packed into batches of at most ``batch_size`` rows
    and, when given, ``max_tokens`` key/value slots (rows x (widest prompt + ``new_tokens``)):
    long prompts get smaller batches, short ones larger.
    """
    order = sorted(features, key=lambda f: f.input_ids[:f.n_prompt])
    groups: list[list[Feature]] = []
    for f in order:
        group = groups[-1] if groups else None
        if (group and len(group) < batch_size
                and _common_prefix(group[0].input_ids[:group[0].n_prompt], f.input_ids[:f.n_prompt]) >= MIN_SHARED_PREFIX):
            group.append(f)
        else:
            groups.append([f])
    groups.sort(key=lambda g: g[0].n_prompt, reverse=True)
    batches: list[list[list[Feature]]] = []
    rows = width = 0
    for group in groups:
        g_width = max(f.n_prompt for f in group)
        over = max_tokens is not None and (rows + len(group)) * (max(width, g_width) + new_tokens) > max_tokens
        if not batches or rows + len(group) > batch_size or (over and rows):
            batches.append([])
            rows = width = 0
        batches[-1].append(group)
        rows += len(group)
        width = max(width, g_width)
    return batches


def collate_shared_prefix(groups: list[list[Feature]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prefixes (one per group) and left-padded remainders (one per row).

    Every remainder keeps at least one token, so each row's last prompt token is decoded with
    its own question. ``row_prefix[i]`` is the group (prefix row) of row i.
    """
    prompts = [[f.input_ids[:f.n_prompt] for f in g] for g in groups]
    shared = [min(min(len(p) for p in ps) - 1, _common_prefix(ps[0], ps[-1])) for ps in prompts]
    p_width = max(shared)
    rest = [p[n:] for ps, n in zip(prompts, shared) for p in ps]
    r_width = max(len(r) for r in rest)
    prefix_ids = torch.full((len(groups), max(p_width, 1)), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros_like(prefix_ids)
    for g, (ps, n) in enumerate(zip(prompts, shared)):
        if n:
            prefix_ids[g, p_width - n:] = torch.tensor(ps[0][:n])
            prefix_mask[g, p_width - n:] = 1
    input_ids = torch.full((len(rest), r_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rest):
        input_ids[i, r_width - len(r):] = torch.tensor(r)
        attention_mask[i, r_width - len(r):] = 1
    row_prefix = torch.tensor([g for g, ps in enumerate(prompts) for _ in ps])
    return {"prefix_ids": prefix_ids, "prefix_mask": prefix_mask, "row_prefix": row_prefix,
            "input_ids": input_ids, "attention_mask": attention_mask}


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int,
                           group_batches: int = 64) -> list[list[int]]:
    """Shuffled batches of similar length, so dynamic padding wastes little compute.

    Indices are shuffled, cut into groups of ``group_batches`` batches, sorted by length inside
    each group and split into batches; the batch order is shuffled again, so training stays
    stochastic. ``seed`` fixes the order (pass seed + epoch for a new order each epoch).
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group = batch_size * group_batches
    batches = []
    for g in range(0, len(order), group):
        chunk = sorted(order[g:g + group], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
