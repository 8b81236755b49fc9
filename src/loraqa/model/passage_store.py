"""Passages' keys and values kept from one decoding batch to the next, and from one request to the next.

A document is read in windows (``inference.documents``), and its questions come one after another:
in ``evaluate`` a window is read by every question BM25 sends to it, over many batches; in ``serve``
by the next request about the same document. A window's part of the prompt (``Context: <window>\\n
Question:``; ``Feature.n_context`` tokens) computes the same keys and values whatever question follows
it, so they are kept here, keyed by the adapter that computed them and the tokens themselves, and
a later batch that reads the same window prefills only its questions. The store is bounded by a
memory budget, least recently used out first; its hits, misses and evictions are counted
(``/metrics``). Only the shared-prefix path reads and fills it (``inference.decoder``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

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
