"""Decoding held to the passage (``--constrain-to-context``): every answer is a span of its context.

At each step a row takes its most likely next token whose text keeps the answer a substring of the
context (whitespace runs compared as one space), looking at the ``top_k`` most likely tokens; EOS
is taken as it comes, a token with a newline when its text before the newline fits; when none of the
``top_k`` fits, the answer ends there. A check of the running text rather than a token trie of the context, so it does not depend
on the passage being tokenised as the answer is (" Denver" after "Context:" vs at a line start).
A character that the vocabulary splits over byte tokens (shown as U+FFFD until complete) cannot
be produced: a rare letter ends the answer before it.
"""

from __future__ import annotations

import re

import torch

_SPACES = re.compile(r"\s+")


def _squash(text: str) -> str:
    return _SPACES.sub(" ", text)


class ContextConstraint:
    """Chooses each row's next token among those that keep its answer inside its context."""

    def __init__(self, tokenizer, contexts: list[str], top_k: int = 20) -> None:
        self.tokenizer = tokenizer
        self.contexts = [_squash(c) for c in contexts]
        self.top_k = top_k
        self.end_id = tokenizer.eos_token_id

    def fits(self, row: int, ids: list[int]) -> bool:
        """Whether the answer so far (the text before a newline: a stop token may carry text) is in the passage."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True).split("\n", 1)[0]
        return _squash(text).strip() in self.contexts[row]

    def __call__(self, logits: torch.Tensor, generated: list[list[int]], rows: list[int]) -> torch.Tensor:
        """(B,) next ids from (B, V) logits, given each row's tokens so far; ``rows`` are the B rows'
        indices in the contexts' order (decoding drops rows that have stopped)."""
        choice = logits.argmax(-1)
        candidates = logits.topk(min(self.top_k, logits.size(-1)), dim=-1).indices.tolist()
        for i, (row, ids) in enumerate(zip(rows, generated)):
            choice[i] = next((t for t in candidates[i] if t == self.end_id or self.fits(row, ids + [t])),
                             self.end_id)
        return choice
