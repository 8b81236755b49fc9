"""A passage read once for all its questions: its keys and values, computed in one prefill, serve
every question's row, in training (with gradients) and in decoding.

SQuAD asks ~5 questions about each passage and the passage is most of every prompt, so a batch of
one passage's questions runs the passage as a left-padded *prefix* (one row per group) and each
question's *remainder* on top of it. Position ids count only real tokens, across prefix and
remainder, so a row computes what it would alone. Training uses :class:`SharedPrefixCache` (a
cache that gradient checkpointing may replay); decoding copies the prefix into each row of a
``StaticCache`` through a :class:`KVPool` (memory reused from batch to batch).
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer

from loraqa.model.multilora import routing
from loraqa.model.load import cache_kwarg


def prefix_positions(prefix_mask: torch.Tensor) -> torch.Tensor:
    """(G, P) position ids of left-padded prefixes: real tokens count 0, 1, ...; pads are masked."""
    return (prefix_mask.cumsum(-1) - 1).clamp(min=0)


def positions_after(past_mask: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids of each row's tokens after its prefix (``past_mask``, (B, P)): real tokens
    count on from the prefix's; pads are masked, whatever their position."""
    return past_mask.sum(-1, keepdim=True) + (mask.cumsum(-1) - 1).clamp(min=0)


class SharedPrefixCache(DynamicCache):
    """A cache whose ``update`` does the same thing every time it is called with the same input, so
    gradient checkpointing may recompute any layer and see what the first pass saw: the prefix's
    cache stores each layer's keys and values (replacing, not appending); the rows' cache, made by
    :meth:`spread`, returns the prefix's followed by the new ones without storing them."""

    reading = False

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        if self.reading:
            return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        layer.keys, layer.values = key_states, value_states
        return key_states, value_states

    def spread(self, row_prefix: torch.Tensor) -> SharedPrefixCache:
        """A read-only cache for the rows: row i holds group ``row_prefix[i]``'s prefix. A new object,
        as the prefix's layers may be recomputed (and call ``update`` here) after the rows' are."""
        rows = copy.copy(self)
        rows.layers = [copy.copy(layer) for layer in self.layers]
        for layer in rows.layers:
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys[row_prefix], layer.values[row_prefix]
        rows.reading = True
        return rows


def continue_from_prefix(lm, batch: dict[str, torch.Tensor]) -> dict:
    """Training: run a batch's shared prefixes through ``lm``'s decoder, and return the inputs that
    continue each row from its group's prefix (the remainders are right-padded). Gradients flow
    back through the prefix's keys and values."""
    decoder = lm.get_decoder()
    name, prefix_cache = cache_kwarg(decoder), SharedPrefixCache(config=lm.config)
    # plain layers: a sliding layer counts its tokens in update(), which this cache replaces; by slot,
    # a passage and its question are as far apart as by position, so windows mask what they should
    prefix_cache.layers = [DynamicLayer() for _ in prefix_cache.layers]
    prefix_mask, row_prefix = batch["prefix_mask"], batch["row_prefix"]
    decoder(input_ids=batch["prefix_ids"], attention_mask=prefix_mask, position_ids=prefix_positions(prefix_mask),
            use_cache=True, **{name: prefix_cache})
    rows_cache = prefix_cache.spread(row_prefix)  # (G, ...) -> (B, ...): index_select, differentiable
    past_mask, mask = prefix_mask[row_prefix], batch["attention_mask"]
    return {"input_ids": batch["input_ids"], "attention_mask": torch.cat([past_mask, mask], dim=1),
            "position_ids": positions_after(past_mask, mask), name: rows_cache}


class KVPool:
    """Key/value memory that every decoding batch's cache reuses: one flat buffer per layer, kind
    and side, regrown only when a batch needs more (a fresh cache-sized tensor has its pages mapped
    and zero-filled by the OS on first touch: docs/design-notes.md). Two sides, so a cache in one
    can be copied into the other (rows dropped, rows carried) without a new tensor."""

    def __init__(self):
        self.buffers: dict[tuple[int, str, int], torch.Tensor] = {}

    def view(self, layer: int, kind: str, like: torch.Tensor, rows: int, side: int = 0) -> torch.Tensor:
        """A contiguous (rows, *like.shape[1:]) tensor of ``like``'s dtype and device."""
        shape = (rows, *like.shape[1:])
        numel = torch.Size(shape).numel()
        buf = self.buffers.get((layer, kind, side))
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.buffers[(layer, kind, side)] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)


def static_cache(lm, max_cache_len: int) -> StaticCache:
    """A ``StaticCache`` for ``lm`` whose every layer is a plain ``StaticLayer``. Decoding writes slots
    by column and sets their lengths itself, which a sliding layer's rolling buffer and its own
    count of tokens do not allow (windows are handled by ``model.support``)."""
    cache = StaticCache(config=lm.config, max_cache_len=max_cache_len)
    cache.layers = [StaticLayer(max_cache_len=max_cache_len) for _ in cache.layers]
    return cache


def spread_static(cache, row_prefix: torch.Tensor, pool: KVPool, rows: int | None = None, side: int = 0) -> None:
    """Decoding: replace each layer's (G, ...) keys and values of a prefilled ``StaticCache`` by
    (B, ...) ones, row i a copy of group ``row_prefix[i]`` (what ``reorder_cache`` does, but into
    ``pool``'s memory). The copied slots past the prefix are the lazily initialised zeros: masked
    slots must hold finite values. With ``rows`` (> B), rows B.. are left for the caller to fill.
    Decoding's dropped rows use it too (``row_prefix`` = the rows kept, into the other side).
    ``side``: the pool's side to write (:class:`KVPool`)."""
    for i, layer in enumerate(cache.layers):
        for kind in ("keys", "values"):
            src = getattr(layer, kind)
            out = pool.view(i, kind, src, rows or len(row_prefix), side)
            torch.index_select(src, 0, row_prefix, out=out[:len(row_prefix)])
            setattr(layer, kind, out)


# a forward's own cost (Python, per-layer small ops) in token-rows of matrix products: measured on
# SmolLM2-135M, 2 CPU cores (~36 ms a call against ~1.4 ms a token); it decides where runs split
RUN_COST_TOKENS = 24


def width_runs(widths: list[int], run_cost: int = RUN_COST_TOKENS) -> list[tuple[int, int]]:
    """Contiguous runs [a, b) of rows sorted widest first, each padded to its first row's width,
    that cost the fewest token-rows in all (``run_cost`` per run): a dynamic programme."""
    best, cut = [0] + [float("inf")] * len(widths), [0] * (len(widths) + 1)
    for b in range(1, len(widths) + 1):
        for a in range(b):
            cost = best[a] + run_cost + (b - a) * widths[a]
            if cost < best[b]:
                best[b], cut[b] = cost, a
    runs, b = [], len(widths)
    while b:
        runs.append((cut[b], b))
        b = cut[b]
    return runs[::-1]


def with_adapters(kw: dict, adapters: list[str] | None) -> dict:
    """``kw`` with ``adapter_names`` (one per row) for ``model.prefix.prefill_runs`` to route a run's
    rows to their adapters (``model.adapters.routing``)."""
    return kw if adapters is None else {**kw, "adapter_names": adapters}


def prefill_runs(model, cache, input_ids: torch.Tensor, lengths: list[int], mask: torch.Tensor,
                 position_ids: torch.Tensor, start: int, kw: dict, room: int | None = None) -> torch.Tensor:
    """Prefill left-padded rows (widest first) into cache slots ``start .. start + width`` in runs
    of similar width (:func:`width_runs`), each run cut to its own width, so little of the padding
    is computed; returns each row's last logits. A run reads and writes its rows of the cache
    through views, and the slots its shorter rows skip stay masked. ``mask`` covers every slot.

    A fresh cache is sized by its first write, which is the first run's: it is then regrown to
    every row (``room`` rows when given), keeping the dtypes the model wrote (a Llama's rotated keys
    can be fp32 under bf16 autocast while its values are bf16)."""
    width = input_ids.size(1)
    rows = room or input_ids.size(0)
    logits = []
    full = [(layer.keys, layer.values) for layer in cache.layers] if cache.layers[0].is_initialized else None
    try:
        for a, b in width_runs(lengths):
            w = max(lengths[a], 1)
            for i, layer in enumerate(cache.layers):
                if full is not None:
                    layer.keys, layer.values = full[i][0][a:b], full[i][1][a:b]
                layer.cumulative_length.fill_(start + width - w)
            run_kw = dict(kw)
            if "shared_prefix" in kw:
                run_kw["shared_prefix"] = kw["shared_prefix"].rows(a, b)
            names = run_kw.pop("adapter_names", None)  # each row's LoRA adapter (model.adapters)
            with routing(model, None if names is None else names[a:b]):
                out = model(input_ids=input_ids[a:b, width - w:], attention_mask=mask[a:b],
                            position_ids=position_ids[a:b, width - w:], logits_to_keep=1, **run_kw)
            logits.append(out.logits[:, -1])
            if full is None:  # the first run sized the cache by its rows: room for all of them
                full = [(_regrown(layer.keys, rows, a, b), _regrown(layer.values, rows, a, b)) for layer in cache.layers]
    finally:
        for layer, (keys, values) in zip(cache.layers, full or []):
            layer.keys, layer.values = keys, values
            layer.cumulative_length.fill_(start + width)
    return torch.cat(logits)


def _regrown(part: torch.Tensor, rows: int, a: int, b: int) -> torch.Tensor:
    whole = part.new_zeros((rows, *part.shape[1:]))
    whole[a:b] = part
    return whole
