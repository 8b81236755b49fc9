"""Batched greedy decoding with the KV cache: batches of prompts in, each row's tokens out as it ends.

Questions about the same passage share its prefill (``model.prefix``): the passage runs once and
its keys and values stay one copy beside the rows' cache, read once for all its questions at
every step (``model.prefix_attention``; a model whose attention does not take it gets a copy in
each row instead). Prompts are left-padded so each row's next token lands in the same column;
position ids count only real tokens, so a padded row computes what it would alone. Rows are
prefilled in runs of similar width, so little padding is computed. Each row stops at its first
stop token and leaves the batch (its rows of the cache dropped), or earlier where the caller's
``prune`` says its answer can no longer be chosen (``inference.rivals``). The cache is a ``StaticCache``
written in place (why: docs/design-notes.md). A LoRA adapter arrives merged
(``model.lora.merge_for_answering``).

A batch's last few rows are *carried*: once at most a quarter of its rows are still decoding, the
next batch is prefilled and they continue among its rows. A step reads every weight whatever the
number of rows, so on a CPU a step of one row costs nearly what a step of sixty does; carried, a
batch's long answers ride along the next batch's steps instead of running alone (docs/speed.md).

With a ``draft`` (``inference.lookup``), a step of few rows checks guessed tokens instead
(``inference.drafting``): the same tokens, several for one forward. The rows decoding, and how they
end: ``inference.rows``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from loraqa.inference.drafting import DRAFT_ROOM, drafts, guess_budget, verify
from loraqa.inference.rows import Live, ended, pruned
from loraqa.model.multilora import routing
from loraqa.model.load import base_model, cache_kwarg
from loraqa.model.passage_store import PassageStore, read_passages
from loraqa.model.prefix import (KVPool, positions_after, prefill_runs, prefix_positions, spread_static, static_cache,
                                  with_adapters)
from loraqa.model.prefix_attention import SharedPrefix, prefix_attention
from loraqa.model.support import DecodingSupport, decoding_support, windows_lifted

CARRY_SHARE = 4  # a batch hands its rows on to the next once at most 1/CARRY_SHARE of them are left


@dataclass
class Batch:
    """Left-padded prompts (or each prompt's remainder after ``prefix``) and the caller's ``tags``,
    one per row. ``prefix`` = (prefix_ids (G, P), prefix_mask (G, P), row_prefix (B,)): passages
    that several rows share, each row's group in ``row_prefix``. ``adapters``: each row's LoRA
    adapter, for a model serving several (``model.adapters``; a group's rows share one; "__base__": none).
    ``keep``: each group's passage may be kept in (and taken from) a ``PassageStore`` (a window's part of
    its prompts, ``Feature.n_context``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    tags: list
    prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    adapters: list[str] | None = None
    keep: list[bool] | None = None


def decode(model, batches: Iterable[Batch], max_new_tokens: int, stop_ids: torch.Tensor,
           pool: KVPool | None = None, *, carry: bool = True, choose=None, watch_id: int | None = None,
           na_thresh: float | None = None, support: DecodingSupport | None = None, on_token=None,
           passages: PassageStore | None = None, prune=None, draft=None
           ) -> Iterator[tuple[object, list[int], float | None]]:
    """Yields (tag, tokens, watched) for every row as it ends: its tokens up to and including its
    first stop token (at most ``max_new_tokens``), and the probability its first token was
    ``watch_id`` (None without one): with the no-answer token, SQuAD v2.0's no-answer probability.

    ``choose(logits, tokens so far, tags)`` replaces the argmax (``inference.constrain.ContextConstraint``).
    With ``na_thresh`` (and ``watch_id``), the first token is ``watch_id`` exactly where its
    probability is above ``na_thresh``, and elsewhere the likeliest other token: the threshold, not
    the argmax, decides whether to answer. ``carry=False`` decodes each batch to its end alone.
    ``on_token(tag, token)`` hears each row's tokens as they are chosen (a server's stream); when it
    returns true, the row ends there (its client is gone: the row's slot goes to the rows left).
    ``support`` (``model.support``; by default the model's own) says whether passages are read once
    (the ``shared`` path) or copied into each row (``copies``), and whether windows are lifted: every
    prompt here must fit the model's smallest window, prompt and answer (``DecodingSupport.fits``).
    ``passages``: where the batches' kept passages (``Batch.keep``) are found and left, on the shared path.
    ``prune(tags, tokens so far, watched)``, after each step, names the live rows to end there, tokens
    as they are (``inference.rivals``: rows whose answer can no longer be chosen).
    ``draft(tag, tokens so far, most)`` guesses up to ``most`` of a row's next tokens
    (``inference.lookup.PromptLookup``; ``draft.most``: a first guess's length, which sizes the room
    kept for guesses), checked in one forward: the tokens are the same.
    """
    support = support or decoding_support(model)
    if support.path not in ("shared", "copies"):
        raise ValueError(f"decode runs the shared and copies paths, not {support.path!r}")
    lm, shared = base_model(model), support.path == "shared"
    attend = functools.partial(_attention, lm, shared, support.window is not None)
    stops = set(stop_ids.tolist())
    pool = pool or KVPool()
    live, batches = None, iter(batches)
    batch = next(batches, None)
    while batch is not None or (live is not None and live.tags):
        if batch is not None:
            # room for guesses' holes only in a batch small enough to check guesses (drafting.drafts):
            # a large one keeps the memory its batch budget counts
            rows = batch.input_ids.size(0) + (len(live.tags) if live is not None else 0)
            guessing = draft is not None and guess_budget(rows) >= 2
            room = max_new_tokens + (DRAFT_ROOM * draft.most if guessing else 0)
            with attend():
                live, logits, first_rows = _admit(model, batch, room, pool,
                                                  live if live and live.tags else None, shared, passages)
            handover = len(live.tags) // CARRY_SHARE if carry else -1
            yield from _first_tokens(live, logits, first_rows, stops, max_new_tokens, choose, watch_id, na_thresh,
                                     on_token)
            yield from pruned(live, prune)
            batch = next(batches, None)
        while live.tags and (batch is None or len(live.tags) > handover):
            guesses = None if draft is None else drafts(live, draft, max_new_tokens)
            if guesses is None:
                yield from _step(model, live, stops, max_new_tokens, choose, attend, on_token)
            else:
                yield from verify(model, live, guesses, stops, max_new_tokens, choose, attend, on_token)
            yield from pruned(live, prune)


@contextmanager
def _attention(lm, shared: bool, lift: bool):
    """Attention through ``model.prefix_attention`` (the shared path), and windows lifted (``model.support``)."""
    with windows_lifted(lm, lift), (prefix_attention(lm) if shared else nullcontext()):
        yield


def _admit(model, batch: Batch, room: int, pool: KVPool, carried: Live | None, shared: bool,
           passages: PassageStore | None = None) -> tuple[Live, torch.Tensor, int]:
    """Prefill ``batch`` into a fresh ``StaticCache`` with ``room`` columns after the prompts (the
    longest answer, and any drafts' holes) and room for the ``carried`` rows, which are
    copied in after it, their filled columns ending where the batch's do (so every pending token
    goes to one column). Where the model allows (``model.prefix_attention``), the passages stay
    one copy each beside the rows' cache; otherwise each row's cache starts with a copy of its passage.
    Returns (the rows: the batch's, sorted widest first, then the carried; the batch's last logits;
    the number of the batch's rows)."""
    lm = base_model(model)
    input_ids, attention_mask = batch.input_ids, batch.attention_mask
    rows, width = input_ids.shape
    lengths = attention_mask.sum(-1)
    order = lengths.argsort(descending=True, stable=True)  # runs of similar width (model.prefix.prefill_runs)
    input_ids, attention_mask, lengths = input_ids[order], attention_mask[order], lengths[order]
    keep = None
    if batch.prefix is None:
        prefix_ids = input_ids.new_zeros(1, 0)
        prefix_mask, row_prefix = attention_mask.new_zeros(1, 0), input_ids.new_zeros(rows)
    else:
        prefix_ids, prefix_mask, row_prefix = batch.prefix
        group_order = prefix_mask.sum(-1).argsort(descending=True, stable=True)
        prefix_ids, prefix_mask = prefix_ids[group_order], prefix_mask[group_order]
        row_prefix = group_order.argsort()[row_prefix[order]]  # each (sorted) row's group, in the groups' new order
        if passages is not None and batch.keep is not None:
            keep = [batch.keep[g] for g in group_order.tolist()]
    past_mask = prefix_mask[row_prefix]  # each row's passage slots
    adapters = group_adapters = None
    if batch.adapters is not None:  # each forward below tells PEFT each of its rows' adapter
        adapters = [batch.adapters[i] for i in order.tolist()]
        group_adapters = [""] * prefix_ids.size(0)
        for row, group in enumerate(row_prefix.tolist()):
            group_adapters[group] = adapters[row]
    # the rows' own cache columns, filled left to right: (without shared passages, the passages,)
    # the questions, then (masked) the columns that carried rows filled beyond this batch's
    # prompts, then the answers
    past = 0 if shared or batch.prefix is None else prefix_ids.size(1)
    extra = 0 if carried is None else len(carried.tags)
    side = 1 if carried is not None and carried.side == 0 else 0  # not the side the carried rows are in
    col = past + width if carried is None else max(past + width, carried.col)
    cache = static_cache(lm, col + room)
    kw = {cache_kwarg(lm): cache, "use_cache": True}
    mask = attention_mask.new_zeros(rows + extra, col + room)
    prefix = None
    if shared:
        prefix = _passages(model, lm, prefix_ids, prefix_mask, row_prefix, carried and carried.prefix, group_adapters,
                           passages, keep)
        kw["shared_prefix"] = prefix
    elif batch.prefix is not None:
        prefix_full = prefix_mask.new_zeros(prefix_mask.size(0), mask.size(1))
        prefix_full[:, :past] = prefix_mask
        with record_function("prefill:passage"):
            prefill_runs(model, cache, prefix_ids, prefix_mask.sum(-1).tolist(), prefix_full,
                         prefix_positions(prefix_mask), 0, with_adapters(kw, group_adapters))
        with record_function("cache:spread"):  # (G, ...) -> (B + carried, ...): each row gets its group's prefix
            spread_static(cache, row_prefix, pool, rows + extra, side)
        mask[:rows, :past] = past_mask
    position_ids = positions_after(past_mask, attention_mask)
    mask[:rows, past:past + width] = attention_mask
    with record_function("prefill:question"):
        logits = prefill_runs(model, cache, input_ids, lengths.tolist(), mask[:rows], position_ids, past,
                              with_adapters(kw, adapters), room=rows + extra)
    for layer in cache.layers:
        layer.cumulative_length.fill_(col)
    live = Live(cache, kw, mask, position_ids[:, -1:] + 1, input_ids.new_zeros(rows),
                [batch.tags[i] for i in order.tolist()], [[] for _ in range(rows)], col, [None] * rows, pool,
                side if past else -1, prefix, adapters)
    if carried is not None:
        with record_function("cache:carry"):
            _take_in(live, carried, rows)
    return live, logits, rows


def _passages(model, lm, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, row_prefix: torch.Tensor,
              carried: SharedPrefix | None, adapters: list[str] | None = None, passages: PassageStore | None = None,
              keep: list[bool] | None = None) -> SharedPrefix:
    """The passages' keys and values, one copy each (``model.prefix_attention``), then those the
    ``carried`` rows read, copied in after them (the rows: the batch's, then the carried). Passages
    ``keep`` marks are taken from ``passages`` where it has them, and left there once computed."""
    carried = None if carried is None else carried.reading()
    groups, width = prefix_ids.shape
    room = groups + (0 if carried is None else carried.mask.size(0))
    slots = max(width, 0 if carried is None else carried.mask.size(1))
    mask = prefix_mask.new_zeros(room, slots)
    mask[:groups, :width] = prefix_mask
    if width:
        keys, values = read_passages(model, lm, prefix_ids, prefix_mask, mask, room, adapters, passages, keep)
    elif carried is not None:  # no passage in this batch: room for the carried rows' alone
        keys = [k.new_zeros(room, *k.shape[1:]) for k in carried.keys]
        values = [v.new_zeros(room, *v.shape[1:]) for v in carried.values]
    else:  # no passage at all: rows attend to their own columns only
        keys, values = _no_passage(lm, prefix_ids.device)
    prefix = SharedPrefix(keys, values, mask.bool(), row_prefix)
    if carried is None:
        prefix.regroup(row_prefix)
    else:
        with record_function("cache:carry"):
            prefix.take_in(carried)
    return prefix


def _no_passage(lm, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's keys and values of no passage: (1, kv heads, 0, head dim), the shapes the
    model's cache would have."""
    config = lm.config.get_text_config()
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = next(lm.parameters()).dtype
    empty = [torch.zeros(1, kv_heads, 0, dim, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
    return empty, list(empty)


def _take_in(live: Live, carried: Live, start: int) -> None:
    """Copy ``carried``'s rows into rows ``start..`` of ``live``, their filled columns ending where
    ``live``'s do (the slots before them zero: masked slots must hold finite values)."""
    n, span = len(carried.tags), slice(live.col - carried.col, live.col)
    for layer, old in zip(live.cache.layers, carried.cache.layers):
        for kind in ("keys", "values"):
            new = getattr(layer, kind)[start:]
            new.zero_()
            new[:, :, span] = getattr(old, kind)[:, :, :carried.col]
    live.mask[start:start + n, span] = carried.mask[:, :carried.col]
    live.positions = torch.cat([live.positions, carried.positions])
    live.pending = torch.cat([live.pending, carried.pending])
    live.tags += carried.tags
    live.made += carried.made
    live.watched += carried.watched
    if live.adapters is not None:
        live.adapters += carried.adapters


def _first_tokens(live: Live, logits: torch.Tensor, rows: int, stops: set, max_new_tokens: int, choose,
                  watch_id, na_thresh, on_token=None) -> Iterator:
    """The batch's first tokens, from its prefill's logits (the carried rows already have theirs)."""
    watched = None if watch_id is None else logits.float().softmax(-1)[:, watch_id]
    if na_thresh is not None:
        abstain = watched > na_thresh
        logits = logits.clone()
        logits[~abstain, watch_id] = float("-inf")
    next_ids = logits.argmax(-1) if choose is None else choose(logits, [[] for _ in range(rows)], live.tags[:rows])
    if na_thresh is not None:
        next_ids = torch.where(abstain, watch_id, next_ids)
    if watched is not None:
        live.watched[:rows] = watched.tolist()
    yield from ended(live, [[t] for t in next_ids.tolist()], stops, max_new_tokens, range(rows), on_token)


def _step(model, live: Live, stops: set, max_new_tokens: int, choose, attend, on_token=None) -> Iterator:
    """Run every row's pending token (inside ``attend()``: the path's attention); choose the next ones."""
    live.mask[:, live.col] = 1
    if live.prefix is not None:
        live.prefix.step(live.mask[:, :live.col + 1])
    with record_function("decode:step"), attend(), routing(model, live.adapters):
        logits = model(input_ids=live.pending[:, None], attention_mask=live.mask, position_ids=live.positions,
                       **live.kw).logits[:, -1]
    live.col += 1
    live.positions = live.positions + 1
    next_ids = logits.argmax(-1) if choose is None else choose(logits, live.made, live.tags)
    yield from ended(live, [[t] for t in next_ids.tolist()], stops, max_new_tokens, range(len(live.tags)), on_token)


@torch.inference_mode()
def greedy_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                    stop_ids: torch.Tensor, pad_id: int,
                    prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                    pool: KVPool | None = None, **options) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch: ((B, longest row) generated ids, each row's ending with its first stop token then
    ``pad_id``; (B,) the watched probabilities or None). ``options`` are :func:`decode`'s."""
    rows = input_ids.size(0)
    out = {tag: (tokens, p) for tag, tokens, p in
           decode(model, [Batch(input_ids, attention_mask, list(range(rows)), prefix)], max_new_tokens, stop_ids,
                  pool, **options)}
    longest = max(len(out[r][0]) for r in range(rows))
    generated = input_ids.new_full((rows, longest), pad_id)
    for r in range(rows):
        generated[r, :len(out[r][0])] = torch.tensor(out[r][0], device=generated.device)
    watched = None if out[0][1] is None else torch.tensor([out[r][1] for r in range(rows)], device=generated.device)
    return generated, watched
