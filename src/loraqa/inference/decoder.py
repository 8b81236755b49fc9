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

With a ``draft`` (``inference.lookup``), a step of few rows runs each row's pending token and a
guess at the tokens after it in one forward, and keeps of the guess what greedy decoding would have
chosen one step at a time (by the same ``choose``), then the token chosen after it: several tokens
for one forward's cost. A row's cache columns for a rejected guess stay masked, holes its position
ids skip, so each row computes what it would alone.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.profiler import record_function
from transformers import StaticCache

from loraqa.model.multilora import routing
from loraqa.model.load import base_model, cache_kwarg
from loraqa.model.passage_store import PassageStore, read_passages
from loraqa.model.prefix import (RUN_COST_TOKENS, KVPool, positions_after, prefill_runs, prefix_positions,
                                  spread_static, static_cache, with_adapters)
from loraqa.model.prefix_attention import SharedPrefix, prefix_attention
from loraqa.model.support import DecodingSupport, decoding_support, windows_lifted

CARRY_SHARE = 4  # a batch hands its rows on to the next once at most 1/CARRY_SHARE of them are left
# a drafting step computes at most this many guessed tokens in all (rows x draft): about twice a
# forward's own cost (model.prefix.RUN_COST_TOKENS), so a step of many rows runs one token each
DRAFT_TOKENS = 2 * RUN_COST_TOKENS
DRAFT_ROOM = 4  # cache columns kept for guesses, in first guesses' lengths (``draft.most``)


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


@dataclass
class Live:
    """The rows decoding now: one batch's, with any carried from the batches before. Every row's
    ``pending`` token (chosen, not yet run) goes to column ``col`` of the cache."""

    cache: StaticCache
    kw: dict
    mask: torch.Tensor       # (R, slots): the filled real slots
    positions: torch.Tensor  # (R, 1): each pending token's position id
    pending: torch.Tensor    # (R,)
    tags: list
    made: list[list[int]]    # each row's tokens so far, pending included
    col: int
    watched: list            # each row's probability that its first token was the watched one, or None
    pool: KVPool
    side: int                # the pool's side that holds the cache (-1: none)
    prefix: SharedPrefix | None = None  # the rows' passages, when kept apart from the cache
    adapters: list[str] | None = None   # each row's LoRA adapter (Batch.adapters)

    def keep(self, rows: torch.Tensor) -> None:
        """Only ``rows`` go on: the others' slots leave the cache (copied into the pool's other side),
        so later steps compute these alone."""
        self.side = 1 if self.side == 0 else 0
        spread_static(self.cache, rows, self.pool, side=self.side)  # the same row gather, into the other side
        self.mask, self.positions, self.pending = self.mask[rows], self.positions[rows], self.pending[rows]
        if self.prefix is not None:
            self.prefix.keep(rows)
        picked = rows.tolist()
        self.tags, self.made, self.watched = ([x[i] for i in picked] for x in (self.tags, self.made, self.watched))
        if self.adapters is not None:
            self.adapters = [self.adapters[i] for i in picked]


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
            room = max_new_tokens + (DRAFT_ROOM * draft.most if draft is not None else 0)
            with attend():
                live, logits, first_rows = _admit(model, batch, room, pool,
                                                  live if live and live.tags else None, shared, passages)
            handover = len(live.tags) // CARRY_SHARE if carry else -1
            yield from _first_tokens(live, logits, first_rows, stops, max_new_tokens, choose, watch_id, na_thresh,
                                     on_token)
            yield from _pruned(live, prune)
            batch = next(batches, None)
        while live.tags and (batch is None or len(live.tags) > handover):
            drafts = None if draft is None else _drafts(live, draft, max_new_tokens)
            if drafts is None:
                yield from _step(model, live, stops, max_new_tokens, choose, attend, on_token)
            else:
                yield from _verify(model, live, drafts, stops, max_new_tokens, choose, attend, on_token)
            yield from _pruned(live, prune)


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


def _ended(live: Live, new: list[list[int]], stops: set, max_new_tokens: int, rows: range, on_token=None
           ) -> Iterator[tuple[object, list[int], float | None]]:
    """Record ``new`` as rows ``rows``' next tokens (one each, or a drafting step's several); yield
    the rows that end with them (at the first that ends them: the rest are dropped) and drop them."""
    going = [i for i in range(len(live.tags)) if i not in rows]
    for i, tokens in zip(rows, new):
        for t in tokens:
            live.made[i].append(t)
            gone = on_token is not None and on_token(live.tags[i], t)  # its listener left: the row ends here
            if gone or t in stops or len(live.made[i]) == max_new_tokens:
                yield live.tags[i], live.made[i], live.watched[i]
                break
        else:
            going.append(i)
    live.pending[rows.start:rows.stop] = torch.tensor([t[-1] for t in new], device=live.pending.device)
    if len(going) < len(live.tags):
        with record_function("cache:compact"):
            live.keep(torch.tensor(sorted(going), dtype=torch.long, device=live.pending.device))


def _pruned(live: Live, prune) -> Iterator[tuple[object, list[int], float | None]]:
    """End the live rows ``prune`` names, with the tokens they have."""
    if prune is None or not live.tags:
        return
    lost = set(prune(live.tags, live.made, live.watched))
    if not lost:
        return
    for i in sorted(lost):
        yield live.tags[i], live.made[i], live.watched[i]
    with record_function("cache:compact"):
        live.keep(torch.tensor([i for i in range(len(live.tags)) if i not in lost], dtype=torch.long,
                               device=live.pending.device))


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
    yield from _ended(live, [[t] for t in next_ids.tolist()], stops, max_new_tokens, range(rows), on_token)


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
    yield from _ended(live, [[t] for t in next_ids.tolist()], stops, max_new_tokens, range(len(live.tags)), on_token)


def _drafts(live: Live, draft, max_new_tokens: int) -> list[list[int]] | None:
    """Each row's guess at its next tokens, as long as the step's budget (``DRAFT_TOKENS``) and the
    cache's room allow: each forward uses its width of columns whatever it keeps, and every row must
    still have room for its longest answer. None where no row has a guess worth a forward."""
    left = [max_new_tokens - len(m) for m in live.made]  # tokens each row may still run
    most = min(DRAFT_TOKENS // len(live.tags), live.mask.size(1) - live.col - max(left))
    if most < 2:  # a guess of one token a row costs more than it saves, at this many rows
        return None
    drafts = [draft(tag, made, min(most, n - 1)) for tag, made, n in zip(live.tags, live.made, left)]
    return drafts if any(drafts) else None


def _verify(model, live: Live, drafts: list[list[int]], stops: set, max_new_tokens: int, choose, attend,
            on_token=None) -> Iterator:
    """Run every row's pending token and its draft in one forward; keep what greedy decoding chooses."""
    rows, width, device = len(live.tags), 1 + max(map(len, drafts)), live.pending.device
    lengths = torch.tensor([len(d) for d in drafts], device=device)[:, None]
    steps = torch.arange(width, device=device)[None]
    tokens = live.pending[:, None].repeat(1, width)
    for i, d in enumerate(drafts):
        tokens[i, 1:1 + len(d)] = torch.tensor(d, device=device)
    live.mask[:, live.col:live.col + width] = steps <= lengths  # a shorter draft's last columns: padding
    positions = live.positions + torch.minimum(steps, lengths)
    with record_function("decode:verify"), attend(), routing(model, live.adapters):
        logits = model(input_ids=tokens, attention_mask=live.mask, position_ids=positions, **live.kw).logits
    new = _kept(logits, drafts, live, stops, max_new_tokens, choose)
    for i, n in enumerate(map(len, new)):  # columns past what a row kept are holes
        live.mask[i, live.col + n:live.col + width] = 0
    live.positions = live.positions + torch.tensor([len(n) for n in new], device=device)[:, None]
    live.col += width
    yield from _ended(live, new, stops, max_new_tokens, range(rows), on_token)


def _kept(logits: torch.Tensor, drafts: list[list[int]], live: Live, stops: set, max_new_tokens: int,
          choose) -> list[list[int]]:
    """Each row's tokens from a drafting step: the choice after its pending token, then after each
    draft token while the choice before it was that draft token (and did not end the row)."""
    new: list[list[int]] = [[] for _ in drafts]
    best = logits.argmax(-1).tolist() if choose is None else None
    active = list(range(len(drafts)))
    for j in range(logits.size(1)):
        if not active:
            break
        if choose is None:
            picked = [best[i][j] for i in active]
        else:
            picked = choose(logits[active, j], [live.made[i] + new[i] for i in active],
                            [live.tags[i] for i in active]).tolist()
        going = []
        for i, t in zip(active, picked):
            new[i].append(t)
            if (j < len(drafts[i]) and drafts[i][j] == t and t not in stops
                    and len(live.made[i]) + len(new[i]) < max_new_tokens):
                going.append(i)
        active = going
    return new


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
