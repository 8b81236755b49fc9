"""Documents longer than a window: the windows they are read in, SQuAD as whole documents, and the
windows that do not hold a question's answer (what a reader trained for documents learns to say
"not here" on).

A window is a span of the document's characters, ``(start, end)``: its text is
``document[start:end]``, so an answer found in a window has its offsets in the document at once.
Windows hold at most ``size`` tokens, end at a paragraph or sentence boundary where one lies in their
last quarter, and overlap their neighbour by about ``overlap`` tokens, so an answer cut by one
window's end is whole in the next.
"""

from __future__ import annotations

import re
from dataclasses import replace

from loraqa.data.examples import Example

BOUNDARY = re.compile(r"\n\s*\n|(?<=[.!?])[\"')\]]*\s+|\n")  # a paragraph, a sentence's end, a line


def split_windows(tokenizer, text: str, size: int, overlap: int) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of ``text``'s windows: each at most about ``size`` tokens
    (as the text's own tokenisation counts them), together covering every character, neighbours
    sharing about ``overlap`` tokens, each starting and ending at a boundary where one is near."""
    if size < 1 or not 0 <= overlap < size:
        raise ValueError(f"a window of {size} tokens cannot overlap its neighbour by {overlap}")
    spans = [(s, e) for s, e in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
             ["offset_mapping"] if e > s]
    if len(spans) <= size:
        return [(0, len(text))]
    cuts = sorted({m.end() for m in BOUNDARY.finditer(text)})
    windows, start, first = [], 0, 0  # first: the window's first token
    while True:
        last = first + size  # one past the last token it may hold
        if last >= len(spans):
            windows.append((start, len(text)))
            return windows
        # its end: the last boundary in its last quarter, else the end of its last token
        end = _last_cut(cuts, spans[first + (3 * size) // 4][0], spans[last - 1][1]) or spans[last - 1][1]
        windows.append((start, end))
        inside = sum(1 for s, _ in spans[first:last] if s < end)
        back = min(spans[first + max(inside - overlap, 1)][0], end)  # about ``overlap`` tokens before the end
        start = next((c for c in cuts if back <= c < end), back)  # moved on to a sentence's start
        first = next(i for i in range(first + 1, len(spans)) if spans[i][1] > start)


def _last_cut(cuts: list[int], lo: int, hi: int) -> int | None:
    inside = [c for c in cuts if lo <= c <= hi]
    return inside[-1] if inside else None


def document_level(examples: list[Example], joiner: str = "\n\n") -> list[Example]:
    """Each question asked against its whole document: the paragraphs of its title joined in file
    order, its answers' offsets shifted to where its paragraph begins (SQuAD-document)."""
    documents: dict[str, list[str]] = {}
    for ex in examples:
        paragraphs = documents.setdefault(ex.title, [])
        if ex.context not in paragraphs:
            paragraphs.append(ex.context)
    starts, texts = {}, {}
    for title, paragraphs in documents.items():
        at = 0
        for p in paragraphs:
            starts[(title, p)] = at
            at += len(p) + len(joiner)
        texts[title] = joiner.join(paragraphs)
    return [replace(ex, context=texts[ex.title],
                    answer_starts=tuple(s + starts[(ex.title, ex.context)] for s in ex.answer_starts))
            for ex in examples]


def document_windows(tokenizer, examples: list[Example], size: int, overlap: int, negatives: int,
                     rank) -> list[Example]:
    """Training examples for reading documents: each answerable question in a window of its whole
    document that holds its answer (else its own paragraph), and in up to ``negatives`` windows that
    do not, as unanswerable examples: those ``rank(question, texts)`` puts first, the ones a reader
    is likeliest to be misled by. Unanswerable questions stay as they are."""
    spans: dict[str, list[tuple[int, int]]] = {}
    out = []
    for ex, doc in zip(examples, document_level(examples)):
        if not ex.answerable:
            out.append(ex)
            continue
        windows = spans.setdefault(doc.context, split_windows(tokenizer, doc.context, size, overlap))
        answer = (doc.answer_starts[0], doc.answer_starts[0] + len(doc.answer))
        holds = next(((s, e) for s, e in windows if s <= answer[0] and answer[1] <= e), None)
        if holds is None:
            out.append(ex)
        else:
            s, e = holds
            out.append(replace(ex, context=doc.context[s:e], answers=(ex.answer,), answer_starts=(answer[0] - s,)))
        free = [w for w in windows if not (w[0] < answer[1] and answer[0] < w[1])]
        for n, w in enumerate(rank(ex.question, [doc.context[s:e] for s, e in free])[:negatives]):
            out.append(Example(f"{ex.id}-not-{n}", ex.title, doc.context[free[w][0]:free[w][1]], ex.question, ()))
    return out
