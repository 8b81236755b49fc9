"""Rows that end early because their answer cannot be chosen.

A question about a document is read in a few windows at once, one row each, and one answer is
chosen among them (``inference.documents``): the answer of the window least likely to hold none
(its no-answer probability, known from the row's first token), among the windows that answered;
ties go to the window BM25 ranked first. So once one row is *sure* to answer, every row of the same
question ranked after it, by (no-answer probability, BM25 rank), has lost whatever it goes on to
say: it ends there, and the question's decoding lasts as long as its chosen answer, not its
longest window's. The choice is the same as when every row decodes to its end; only the losers'
answers, which nothing reads, are cut (``tests/inference/test_rivals.py`` pins both).

Sure to answer: the row has ended with a non-empty answer, or its text so far already holds a
character that no later token can take back (not a space, not the replacement character a byte
left half-decoded shows, before any newline: an answer is its text's first line, stripped). With a
no-answer *phrase* (``--no-answer-text``), a row is sure only once it has ended, since the phrase
may still be what it is spelling; with ``--na-prob-thresh``, a row over the threshold never is.
"""

from __future__ import annotations

from loraqa.data.features import Feature

HALF_DECODED = "\ufffd"  # what a byte of a character not yet complete decodes to


class Rivals:
    """Called by the decoder after each step with its live rows (``prune``); told each row's final
    answer as it ends (``ended``). Rows are known by their tags: indices into the features."""

    def __init__(self, tokenizer, ranks: dict[int, tuple[str, int]], phrase: bool = False,
                 na_thresh: float | None = None) -> None:
        self.tokenizer, self.ranks, self.phrase, self.na_thresh = tokenizer, ranks, phrase, na_thresh
        self.best: dict[str, tuple[float, int]] = {}  # each question's best row sure to answer: (no-answer p, rank)
        self.cut: set[int] = set()                    # rows ended here

    @classmethod
    def of(cls, tokenizer, features: list[Feature], no_answer: str, na_thresh: float | None) -> Rivals | None:
        """The rivals among ``features`` (those with ``window_of``), or None where there are none."""
        ranks = {i: f.window_of for i, f in enumerate(features) if f.window_of is not None}
        return cls(tokenizer, ranks, bool(no_answer), na_thresh) if ranks else None

    def ended(self, tag: int, answer: str, watched: float | None) -> None:
        """A row ended with ``answer`` (its final one: "" where it abstained)."""
        if answer and tag in self.ranks and tag not in self.cut and watched is not None:
            self._sure(tag, watched)

    def __call__(self, tags: list, made: list[list[int]], watched: list) -> list[int]:
        """The indices of the live rows to end now: each ranked after a row of its question that is sure to answer."""
        for tag, tokens, p in zip(tags, made, watched):
            # a row at or behind its question's best cannot better it: its text need not be decoded again
            if (tag in self.ranks and p is not None and not self._behind(tag, p, or_at=True)
                    and self._answers(tokens, p)):
                self._sure(tag, p)
        lost = [i for i, (tag, p) in enumerate(zip(tags, watched))
                if tag in self.ranks and p is not None and self._behind(tag, p)]
        self.cut.update(tags[i] for i in lost)
        return lost

    def _behind(self, tag: int, p: float, or_at: bool = False) -> bool:
        """Whether the row ranks after its question's best row sure to answer (or is that row)."""
        question, rank = self.ranks[tag]
        best = self.best.get(question)
        return best is not None and ((p, rank) >= best if or_at else (p, rank) > best)

    def _sure(self, tag: int, p: float) -> None:
        question, rank = self.ranks[tag]
        if question not in self.best or (p, rank) < self.best[question]:
            self.best[question] = (p, rank)

    def _answers(self, tokens: list[int], p: float) -> bool:
        """Whether a live row's answer can no longer be empty, whatever it says next."""
        if self.phrase or (self.na_thresh is not None and p > self.na_thresh):
            return False
        line = self.tokenizer.decode(tokens, skip_special_tokens=True).split("\n", 1)[0]
        return any(not c.isspace() and c != HALF_DECODED for c in line)
