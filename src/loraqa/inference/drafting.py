"""Decoding steps that check guessed tokens (``inference.lookup``): a step of few rows runs each
row's pending token and its guess at the tokens after it in one forward, and keeps of the guess what
greedy decoding would have chosen one step at a time (by the same ``choose``), then the token chosen
after it: several tokens for one forward's cost (a forward reads every weight whatever its tokens:
on a CPU one of ten tokens costs little more than one of one). A row's cache columns for a rejected
guess stay masked, holes its position ids skip, so each row computes what it would alone.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.profiler import record_function

from loraqa.inference.rows import Live, ended
from loraqa.model.multilora import routing
from loraqa.model.prefix import RUN_COST_TOKENS

# a drafting step computes at most this many guessed tokens in all (rows x draft): about twice a
# forward's own cost (model.prefix.RUN_COST_TOKENS), so a step of many rows runs one token each
DRAFT_TOKENS = 2 * RUN_COST_TOKENS
DRAFT_ROOM = 4  # cache columns kept for guesses, in first guesses' lengths (``draft.most``)


def guess_budget(rows: int) -> int:
    """The longest guess a row may get in a step of ``rows`` rows; below 2 the step guesses nothing
    (a guess of one token a row costs more than it saves, at that many rows)."""
    return DRAFT_TOKENS // rows


def drafts(live: Live, draft, max_new_tokens: int) -> list[list[int]] | None:
    """Each row's guess at its next tokens, as long as the step's budget (:func:`guess_budget`) and
    the cache's room allow: each forward uses its width of columns whatever it keeps, and every row
    must still have room for its longest answer. None where no row has a guess worth a forward."""
    most = guess_budget(len(live.tags))
    if most < 2:  # checked first: a step of many rows pays nothing for guessing
        return None
    left = [max_new_tokens - len(m) for m in live.made]  # tokens each row may still run
    most = min(most, live.mask.size(1) - live.col - max(left))
    if most < 2:
        return None
    guesses = [draft(tag, made, min(most, n - 1)) for tag, made, n in zip(live.tags, live.made, left)]
    return guesses if any(guesses) else None


def verify(model, live: Live, drafts: list[list[int]], stops: set, max_new_tokens: int, choose, attend,
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
    new = kept(logits, drafts, live, stops, max_new_tokens, choose)
    for i, n in enumerate(map(len, new)):  # columns past what a row kept are holes
        live.mask[i, live.col + n:live.col + width] = 0
    live.positions = live.positions + torch.tensor([len(n) for n in new], device=device)[:, None]
    live.col += width
    yield from ended(live, new, stops, max_new_tokens, range(rows), on_token)


def kept(logits: torch.Tensor, drafts: list[list[int]], live: Live, stops: set, max_new_tokens: int,
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
