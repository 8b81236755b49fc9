"""Which examples go together in a batch, and how a batch that shares a passage is laid out.

SQuAD asks ~5 questions about each passage, and the passage is most of every prompt. Batches
that keep a passage's questions together compute the passage once (a shared prefix) and only
each question's remainder per row: decoding reads it once per batch, and so can training (the
gradient flows back through the shared keys and values). Otherwise training batches are
length-grouped so dynamic padding wastes little compute.
"""

from __future__ import annotations

import random

import torch

from loraqa import IGNORE_INDEX
from loraqa.data.features import Feature

MIN_SHARED_PREFIX = 16  # tokens; shorter common prefixes are not worth a separate prefill


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _prompt(f: Feature) -> list[int]:
    return f.input_ids[:f.n_prompt]


def _runs(items: list, prompt, kind=lambda x: "") -> list[list]:
    """Consecutive runs of ``items`` of one ``kind`` whose prompt shares at least
    ``MIN_SHARED_PREFIX`` tokens with the run's first."""
    groups: list[list] = []
    for x in items:
        if groups and kind(groups[-1][0]) == kind(x) and \
                common_prefix(prompt(groups[-1][0]), prompt(x)) >= MIN_SHARED_PREFIX:
            groups[-1].append(x)
        else:
            groups.append([x])
    return groups


def context_groups(features: list[Feature], kind: dict[str, str] | None = None) -> list[list[int]]:
    """Indices of ``features`` grouped by a shared prompt prefix of at least ``MIN_SHARED_PREFIX``
    tokens (in SQuAD: one passage each; a lone prompt is a group of one), in token-id order. With
    ``kind`` ({feature id: kind}, e.g. the LoRA adapter each question is answered with), a group
    holds one kind only: a passage's keys and values differ by adapter."""
    def of(i: int) -> str:
        return kind.get(features[i].id, "") if kind else ""

    order = sorted(range(len(features)), key=lambda i: (of(i), _prompt(features[i])))
    return _runs(order, lambda i: _prompt(features[i]), of)


def split_groups(features: list[Feature]) -> list[list[Feature]]:
    """Consecutive runs of ``features`` that share a prefix with the run's first (a batch's groups)."""
    return _runs(features, _prompt)


def shared_prefix_batches(features: list[Feature], batch_size: int, max_tokens: int | None = None,
                          new_tokens: int = 0, kind: dict[str, str] | None = None) -> list[list[list[Feature]]]:
    """Decoding batches: groups of prompts that share a prefix (and ``kind``: see
    :func:`context_groups`), packed by prompt length; a batch may mix kinds.

    A group holds at most ``batch_size`` prompts. Groups of similar prefix length are packed
    into batches of at most ``batch_size`` rows and, when given, ``max_tokens`` key/value slots
    (rows x (widest prompt + ``new_tokens``)): long prompts get smaller batches, short ones larger.
    The batches come shortest prompts first: a batch's last rows, carried into the next
    (``inference.decoder``), then fit in the columns its longer prompts fill anyway.
    """
    groups = [[features[i] for i in g[c:c + batch_size]]
              for g in context_groups(features, kind) for c in range(0, len(g), batch_size)]
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
    return batches[::-1]


def context_batches(groups: list[list[int]], batch_size: int, seed: int) -> list[list[int]]:
    """Training batches that keep each passage's questions together: passages in a shuffled
    order, questions shuffled inside each, cut into batches of ``batch_size`` (a passage's
    questions may continue into the next batch). ``seed`` fixes the order."""
    rng = random.Random(seed)
    groups = [rng.sample(g, len(g)) for g in groups]
    rng.shuffle(groups)
    stream = [i for g in groups for i in g]
    return [stream[b:b + batch_size] for b in range(0, len(stream), batch_size)]


def _prefixes(groups: list[list[Feature]], pad_id: int):
    """Left-padded shared prefixes, one row per group, and each group's prefix length. Every
    prompt keeps at least its last token out of the prefix, so each row has a remainder."""
    prompts = [[_prompt(f) for f in g] for g in groups]
    shared = [min(min(len(p) for p in ps) - 1, min(common_prefix(ps[0], p) for p in ps), _context_part(g))
              for g, ps in zip(groups, prompts)]
    width = max(max(shared), 1)
    prefix_ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros_like(prefix_ids)
    for g, (ps, n) in enumerate(zip(prompts, shared)):
        if n:
            prefix_ids[g, width - n:] = torch.tensor(ps[0][:n])
            prefix_mask[g, width - n:] = 1
    row_prefix = torch.tensor([g for g, ps in enumerate(prompts) for _ in ps])
    return {"prefix_ids": prefix_ids, "prefix_mask": prefix_mask, "row_prefix": row_prefix}, shared


def _context_part(group: list[Feature]) -> int:
    """A window's questions share its part of their prompts, not the first words their questions have
    in common too: so the prefix is the same whatever questions a batch holds (``PassageStore``)."""
    parts = [f.n_context for f in group]
    return min(parts) if all(n is not None for n in parts) else 1 << 62


def kept_groups(groups: list[list[Feature]]) -> list[bool]:
    """Whether each group's prefix is a window's part of its prompts (``Batch.keep``)."""
    return [all(f.n_context is not None for f in g) for g in groups]


def collate_shared_prefix(groups: list[list[Feature]], pad_id: int) -> dict[str, torch.Tensor]:
    """For decoding: left-padded prefixes (one per group) and left-padded prompt remainders (one
    per row); ``row_prefix[i]`` is the group (prefix row) of row i."""
    batch, shared = _prefixes(groups, pad_id)
    rest = [_prompt(f)[n:] for g, n in zip(groups, shared) for f in g]
    width = max(len(r) for r in rest)
    input_ids = torch.full((len(rest), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rest):
        input_ids[i, width - len(r):] = torch.tensor(r)
        attention_mask[i, width - len(r):] = 1
    return {**batch, "input_ids": input_ids, "attention_mask": attention_mask}


def collate_context_train(features: list[Feature], pad_id: int) -> dict[str, torch.Tensor]:
    """For training: the batch's shared prefixes (left-padded) and each row's remainder of the
    prompt + answer + EOS (right-padded), labels on the answer + EOS only, set by position as in
    :func:`loraqa.data.features.collate_train`. Equal, row by row, to ``collate_train`` of the same
    features split at each group's prefix.

        prefix (per group)  _  _  P  P  P          remainder (per row)  Q  Q  A  A  E  _
        labels                                                        -100 -100 A A E -100
    """
    groups = split_groups(features)
    batch, shared = _prefixes(groups, pad_id)
    rest = [(f.input_ids[n:], f.n_prompt - n) for g, n in zip(groups, shared) for f in g]
    width = max(len(ids) for ids, _ in rest)
    input_ids = torch.full((len(rest), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, (ids, n_prompt) in enumerate(rest):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        labels[i, n_prompt:len(ids)] = input_ids[i, n_prompt:len(ids)]
    return {**batch, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


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


def padded_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Token positions a collated training batch runs, padding included (shared prefixes once)."""
    return batch["input_ids"].numel() + (batch["prefix_ids"].numel() if "prefix_ids" in batch else 0)


def micro_batches(features: list[Feature], collate, pad_id: int, max_tokens: int | None) -> list[dict]:
    """``collate`` of consecutive slices of ``features``, each at most ``max_tokens`` padded tokens
    (a single example over it runs alone). Their summed losses and gradients are the whole batch's:
    the loss is a sum over answer tokens, scaled by the whole batch's count. Slices follow the
    batch's order, so a passage's questions stay together unless the passage alone is too big."""
    if not max_tokens:
        return [collate(features, pad_id)]
    parts, start = [], 0
    while start < len(features):
        end, part = start + 1, collate(features[start:start + 1], pad_id)
        while end < len(features):
            wider = collate(features[start:end + 1], pad_id)
            if padded_tokens(wider) > max_tokens:
                break
            end, part = end + 1, wider
        parts.append(part)
        start = end
    return parts
