"""Passages' keys and values kept from one decoding batch to the next, and from one request to the next.

A document is read in windows (``inference.documents``), and its questions come one after another:
in ``evaluate`` a window is read by every question BM25 sends to it, over many batches; in ``serve``
by the next request about the same document. A window's part of the prompt (``Context: <window>\\n
Question:``; ``Feature.n_context`` tokens) computes the same keys and values whatever question follows
it, so they are kept here, keyed by the adapter that computed them and the tokens themselves, and
a later batch that reads the same window prefills only its questions. The store is bounded by a
memory budget, least recently used out first; its hits, misses and evictions are counted
(``/metrics``). Only the shared-prefix path reads and fills it: :func:`read_passages` (a decoding
batch's passages, ``inference.decoder``) and :func:`keep_passage` (one window read ahead, ``serve``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from loraqa.model.load import base_model, cache_kwarg
from loraqa.model.multilora import BASE
from loraqa.model.prefix import prefill_runs, prefix_positions, static_cache, with_adapters
from loraqa.model.prefix_attention import prefix_attention
from loraqa.model.support import DecodingSupport, decoding_support, windows_lifted

DEFAULT_BUDGET = 1 << 30  # bytes: ~50 windows of 384 tokens for SmolLM2 (46 KB a token, fp32)


@dataclass
class Kept:
    keys: list[torch.Tensor]    # each layer's (kv heads, tokens, head dim)
    values: list[torch.Tensor]
    size: int                   # bytes


class PassageStore:
    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        self.budget = budget
        self.entries: OrderedDict[tuple[str, tuple[int, ...]], Kept] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.ahead = 0  # windows kept before a question asked them (``serve``'s read-ahead)

    def get(self, adapter: str, ids: tuple[int, ...], count: bool = True) -> Kept | None:
        """The keys and values of passage ``ids`` as ``adapter`` computed them (None: not kept);
        ``count``: a question's read (a hit or a miss), not a read-ahead."""
        kept = self.entries.get((adapter, ids))
        if kept is None:
            self.misses += count
            return None
        self.entries.move_to_end((adapter, ids))
        self.hits += count
        return kept

    def put(self, adapter: str, ids: tuple[int, ...], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keep copies of a passage's keys and values (each layer's (kv heads, tokens, head dim)), the
        least recently used passages out until they fit; one larger than the budget is not kept."""
        size = sum(t.numel() * t.element_size() for t in (*keys, *values))
        if size > self.budget or (adapter, ids) in self.entries:
            return
        while self.bytes + size > self.budget:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.size
            self.evictions += 1
        self.entries[(adapter, ids)] = Kept([k.clone() for k in keys], [v.clone() for v in values], size)
        self.bytes += size

    def has_room(self) -> bool:
        """Whether one more passage as large as the largest kept fits without letting another go."""
        largest = max((kept.size for kept in self.entries.values()), default=0)
        return self.bytes + largest <= self.budget

    def drop(self, adapter: str) -> None:
        """Forget what ``adapter`` computed (it was unloaded: its handle is never used again)."""
        for key in [k for k in self.entries if k[0] == adapter]:
            self.bytes -= self.entries.pop(key).size


@torch.inference_mode()
def keep_passage(model, ids: list[int], adapter: str | None, passages: PassageStore,
                 support: DecodingSupport | None = None) -> bool:
    """Prefill passage ``ids`` alone (with ``adapter``, a model's LoRA handle, or None) into ``passages``,
    as a batch that reads it would keep it; False where it was kept already or the path is not the
    shared one (the caller's precision applies: run it under its autocast)."""
    support = support or decoding_support(model)
    if support.path != "shared" or (adapter or BASE, tuple(ids)) in passages.entries:
        return False
    lm = base_model(model)
    ids_t = torch.tensor([ids], device=next(lm.parameters()).device)
    mask = torch.ones_like(ids_t)
    with windows_lifted(lm, support.window is not None), prefix_attention(lm):
        read_passages(model, lm, ids_t, mask, mask.clone(), 1, None if adapter is None else [adapter], passages,
                       [True], count=False)
    return True


def read_passages(model, lm, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, mask: torch.Tensor, room: int,
                   adapters: list[str] | None, passages: PassageStore | None, keep: list[bool] | None,
                   count: bool = True):
    """Each layer's (room, kv heads, slots, head dim) keys and values of the passages (left-padded in
    ``prefix_ids``' width): those ``passages`` keeps copied in, the others prefilled (and then kept)."""
    groups, width = prefix_ids.shape
    lengths = prefix_mask.sum(-1).tolist()
    names = adapters or [BASE] * groups
    ids = [tuple(prefix_ids[g, width - n:].tolist()) if keep and keep[g] and n else None for g, n in enumerate(lengths)]
    found = [passages.get(names[g], ids[g], count) if ids[g] else None for g in range(groups)]
    todo = [g for g in range(groups) if found[g] is None]
    keys = values = None
    if len(todo) == groups:  # nothing kept: all prefilled, as without a store
        store = static_cache(lm, mask.size(1))
        with record_function("prefill:passage"):
            prefill_runs(model, store, prefix_ids, lengths, mask[:groups], prefix_positions(prefix_mask), 0,
                         with_adapters({cache_kwarg(lm): store, "use_cache": True}, adapters), room=room)
        keys, values = [layer.keys for layer in store.layers], [layer.values for layer in store.layers]
        return _kept_back(passages, names, ids, lengths, width, keys, values)
    if todo:  # those not kept, cut to their own width (a fresh cache's first write must start at its slot 0)
        pick, cut = torch.tensor(todo, device=prefix_ids.device), lengths[todo[0]]
        store = static_cache(lm, cut)
        with record_function("prefill:passage"):
            prefill_runs(model, store, prefix_ids[pick, width - cut:], [lengths[g] for g in todo],
                         prefix_mask[pick, width - cut:], prefix_positions(prefix_mask[pick, width - cut:]), 0,
                         with_adapters({cache_kwarg(lm): store, "use_cache": True},
                                        adapters and [adapters[g] for g in todo]))
        keys, values = [layer.keys for layer in store.layers], [layer.values for layer in store.layers]
    like = found[next(g for g in range(groups) if found[g] is not None)]
    shapes = [(room, k.size(0), mask.size(1), k.size(-1)) for k in like.keys]
    full_keys = [k.new_zeros(shape) for k, shape in zip(like.keys, shapes)]
    full_values = [v.new_zeros(shape) for v, shape in zip(like.values, shapes)]
    for layer in range(len(full_keys)):
        for j, g in enumerate(todo):
            full_keys[layer][g, :, width - cut:width] = keys[layer][j]
            full_values[layer][g, :, width - cut:width] = values[layer][j]
        for g, kept in enumerate(found):
            if kept is not None:
                full_keys[layer][g, :, width - lengths[g]:width] = kept.keys[layer]
                full_values[layer][g, :, width - lengths[g]:width] = kept.values[layer]
    return _kept_back(passages, names, [ids[g] if g in todo else None for g in range(groups)], lengths, width,
                      full_keys, full_values)


def _kept_back(passages: PassageStore | None, names: list[str], ids: list[tuple[int, ...] | None], lengths: list[int],
               width: int, keys: list[torch.Tensor], values: list[torch.Tensor]):
    """Leave the passages marked by ``ids`` in ``passages``; return (keys, values)."""
    for g, passage in enumerate(ids):
        if passage is not None:
            span = slice(width - lengths[g], width)
            passages.put(names[g], passage, [k[g, :, span] for k in keys], [v[g, :, span] for v in values])
    return keys, values
