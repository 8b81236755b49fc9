"""Drafts of a row's next tokens from its own prompt: prompt lookup decoding (Saxena 2023; what
transformers' ``generate(prompt_lookup_num_tokens=...)`` does for one row).

An extractive answer copies its passage, so once a row's last tokens are found in its prompt, the
tokens that follow them there are a good guess at what it says next. The decoder runs a row's
pending token and its draft in one forward and keeps, of the draft, the tokens greedy decoding
would have chosen one step at a time, then the token chosen after the last of them
(``inference.drafting``): the same answer in fewer forwards. A forward reads every weight whatever
its tokens, so on a CPU one of nine tokens costs little more than one of one (SmolLM2 on 2 cores:
107 ms against 84, ``benchmarks/drafting.py``); a question about a document read ahead pays for its
own tokens, and most of those are its answer's.
"""

from __future__ import annotations

NGRAM = 3  # the longest tail of the answer looked up; a longer match is a surer guess


class PromptLookup:
    """``draft(tag, tokens so far, most)``: the tokens that follow, in the row's prompt, the first
    place where its last ``NGRAM`` tokens (or fewer, down to one) appear: ``self.most`` of them, or
    up to ``most`` (the decoder's budget) once the row's last guess was kept whole: a long answer
    copied from its passage then takes one more forward, not one per ``self.most`` tokens.
    ``prompts``: each row's prompt tokens, by tag."""

    def __init__(self, prompts: list[list[int]], most: int = 8) -> None:
        self.prompts, self.most = prompts, most
        self.last: dict[int, tuple[int, list[int]]] = {}  # each row's last guess: (its tokens then, the guess)

    def __call__(self, tag: int, made: list[int], most: int) -> list[int]:
        before, guess = self.last.get(tag, (0, None))
        whole = bool(guess) and made[before:before + len(guess)] == guess and len(made) == before + len(guess) + 1
        prompt, length = self.prompts[tag], most if whole else min(self.most, most)
        draft = []
        for n in range(min(NGRAM, len(made)), 0, -1):
            end = follows(prompt, made[-n:])
            if end is not None:
                draft = prompt[end:end + length]
                break
        self.last[tag] = (len(made), draft)
        return draft


def follows(tokens: list[int], tail: list[int]) -> int | None:
    """Where the first occurrence of ``tail`` in ``tokens`` that something follows ends, or None.
    A scan (list.index runs in C): no index to keep for each of thousands of prompts."""
    n, start = len(tail), 0
    while True:
        try:
            i = tokens.index(tail[0], start, len(tokens) - n)
        except ValueError:
            return None
        if tokens[i:i + n] == tail:
            return i + n
        start = i + 1
