"""The rows decoding now (``inference.decoder``): their cache, masks and tokens, and how rows end
and leave it (compacted: the others' slots copied into the pool's other side)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.profiler import record_function
from transformers import StaticCache

from loraqa.model.prefix import KVPool, spread_static
from loraqa.model.prefix_attention import SharedPrefix


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


def ended(live: Live, new: list[list[int]], stops: set, max_new_tokens: int, rows: range, on_token=None
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


def pruned(live: Live, prune) -> Iterator[tuple[object, list[int], float | None]]:
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
