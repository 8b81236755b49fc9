"""Questions about passages of any length: a passage that fits one window is answered as it always
was; a longer one (a whole document) is read in windows (``data.documents``), each question in the
few windows a lexical ranker (BM25, ``bm25s``) puts first, and one answer is chosen across them.

The choice: each window's answer comes with the reader's probability that the answer is *not*
there (its first token the no-answer token: EOS, or ``no_answer_text``'s first), the same number in
every window whatever its text, so windows compare (a reader trained with windows that do not hold
the answer, the ``documents`` preset, learns to say so). The answer is the one of the window where
that probability is lowest among the windows that answered; where every window abstains, the
question's answer is "" ("not found in the document"). The question's no-answer probability (SQuAD
v2.0's null score) is the lowest of its windows', as transformers' ``postprocess_qa_predictions``
takes the lowest null score across a question's windows.

Each answer says where it came from (:class:`Source`): the window (its index in the document and its
characters), its score, and the answer's character offsets in the document.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

from loraqa.data.documents import split_windows
from loraqa.data.examples import Example
from loraqa.data.batching import common_prefix
from loraqa.data.features import Feature, FeatureStats, build_eval_features
from loraqa.data.prompt import format_prompt, prompt_of
from loraqa.inference.generate import predict
from loraqa.inference.settings import DecodeSettings
from loraqa.io import log
from loraqa.model.passage_store import PassageStore

QUESTION_ROOM = 64  # tokens a window leaves for the question (a longer one cuts the window's end, counted)
MIN_WINDOW = 32     # tokens: a smaller window would hold a sentence or less
RECENT = 8          # passages whose token counts, windows and BM25 index are kept (``_windows``)
SEP = "\x1f"        # between a question's id and its window's index, in the ids of window questions


@dataclass(frozen=True)
class Source:
    """Where a document's answer came from."""

    window: int               # the window's index in its document
    window_start: int         # the window's characters in the document: [window_start, window_end)
    window_end: int
    score: float              # the reader's probability that the answer is in this window (1 - no-answer)
    start: int | None = None  # the answer's characters in the document (its first occurrence in the window)
    end: int | None = None
    windows_read: int = 0     # how many of the document's windows this question was read in


@dataclass
class Read:
    """What :func:`read` answered: {id: answer}, {id: no-answer probability}, {id: Source} for the
    questions read in windows, and the counts."""

    answers: dict[str, str] = field(default_factory=dict)
    na_probs: dict[str, float] = field(default_factory=dict)
    sources: dict[str, Source] = field(default_factory=dict)
    stats: FeatureStats = field(default_factory=FeatureStats)
    documents: int = 0        # passages read in windows
    windows: int = 0          # their windows
    window_questions: int = 0  # (question, window) pairs answered


def window_size(tokenizer, settings: DecodeSettings) -> int | None:
    """Passage tokens a window holds: ``--window-tokens``, or less where the prompt budget is smaller;
    None where the budget leaves fewer than ``MIN_WINDOW`` (passages are then cut to fit, counted,
    as before windows)."""
    overhead = len(tokenizer(prompt_of(Example("", "", "", "", ()), settings.template))["input_ids"])
    room = settings.max_length - settings.max_new_tokens - overhead - QUESTION_ROOM
    return min(settings.window_tokens, room) if room >= MIN_WINDOW else None


def token_counts(tokenizer, examples: list[Example]) -> dict[str, int]:
    """Each distinct passage's length in tokens (a document's questions share one count)."""
    return {c: _count(tokenizer, c) for c in dict.fromkeys(ex.context for ex in examples)}


# the last few passages' token counts, windows and BM25 index, kept: a server's next question about
# a document tokenises, splits and indexes it again otherwise (~0.1 s for 5,000 words on 2 cores)
@functools.lru_cache(maxsize=RECENT)
def _count(tokenizer, context: str) -> int:
    return len(tokenizer(context, add_special_tokens=False)["input_ids"])


@functools.lru_cache(maxsize=RECENT)
def _windows(tokenizer, context: str, size: int, overlap: int, k: int):
    """(a long passage's windows, their BM25 index: None where there are at most ``k``)."""
    windows = tuple(split_windows(tokenizer, context, size, overlap))
    return windows, (bm25_index([context[s:e] for s, e in windows]) if len(windows) > k else None)


def bm25_index(texts: list[str]):
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    return retriever


def rank(questions: list[str], texts: list[str], k: int, index=None) -> list[list[int]]:
    """For each question, the indices of the ``k`` texts BM25 scores highest for it (ties: document
    order); the texts are indexed once for all the questions (``index``: already, by ``bm25_index``)."""
    import bm25s

    if len(texts) <= k:
        return [list(range(len(texts))) for _ in questions]
    retriever = index or bm25_index(texts)
    ranked = []
    for question in questions:
        query = bm25s.tokenize([question], stopwords="en", show_progress=False)
        if not len(query.vocab):  # nothing but stop words: the document's first windows
            ranked.append(list(range(k)))
            continue
        found, _ = retriever.retrieve(query, k=k, show_progress=False)
        ranked.append([int(i) for i in found[0]])
    return ranked


@dataclass
class Plan:
    """The questions to ask for ``examples``: those that fit a window as they are, then each long
    passage's questions in their windows (ids ``{id}{SEP}{window}``)."""

    examples: list[Example]
    asked: list[Example]
    long: set[str]
    spans: dict[str, list[tuple[int, int]]]  # each long passage's windows
    chosen: dict[str, list[int]]             # each long question's windows, best first
    size: int


def plan(tokenizer, examples: list[Example], settings: DecodeSettings, counts: dict[str, int] | None = None) -> Plan:
    """Which questions are read in windows, and in which windows (BM25's first). ``counts``: each
    passage's tokens, where the caller has them (:func:`token_counts`)."""
    size = window_size(tokenizer, settings)
    overlap = min(settings.doc_stride, (size or 0) // 2)  # a small window cannot share a full stride
    counts = counts if counts is not None or not size else token_counts(tokenizer, examples)
    long = {ex.id for ex in examples if size and counts[ex.context] > size}
    done = Plan(examples, [ex for ex in examples if ex.id not in long], long, {}, {}, size)
    by_passage: dict[str, list[Example]] = {}
    for ex in examples:
        if ex.id in long:
            by_passage.setdefault(ex.context, []).append(ex)
    for context, questions in by_passage.items():
        windows, index = _windows(tokenizer, context, size, overlap, settings.windows_per_question)
        done.spans[context] = list(windows)
        ranked = rank([ex.question for ex in questions], [context[s:e] for s, e in windows],
                      settings.windows_per_question, index)
        for ex, chosen in zip(questions, ranked):
            done.chosen[ex.id] = chosen
    for ex in examples:  # in the examples' order
        if ex.id in long:
            windows = done.spans[ex.context]
            done.asked += [Example(f"{ex.id}{SEP}{w}", ex.title, ex.context[windows[w][0]:windows[w][1]],
                                   ex.question, ()) for w in done.chosen[ex.id]]
    return done


def window_part(tokenizer, template: str, window: str) -> list[int] | None:
    """The tokens of a window's prompts before their question (``Context: <window>\nQuestion:``: the
    space after it joins the question's first word); None for a template that puts the question first."""
    if template.find("{context}") > template.find("{question}"):
        return None
    return tokenizer(format_prompt(template[:template.index("{question}")].rstrip(), window, ""))["input_ids"]


def mark_windows(tokenizer, features: list[Feature], asked: Plan, template: str) -> list[Feature]:
    """``features`` with each window question's ``n_context``: its prompt's tokens up to its question,
    its window's part (the same for every question about the window, what a batch shares and a
    ``PassageStore`` keeps); and its ``window_of``: its question and the window's rank among the
    question's (the rows one answer is chosen among, ``inference.rivals``)."""
    if not asked.long:
        return features
    windows = {ex.id: ex.context for ex in asked.asked if SEP in ex.id}
    parts: dict[str, list[int] | None] = {}
    marked = []
    for f in features:
        window = windows.get(f.id)
        if window is not None:
            if window not in parts:
                parts[window] = window_part(tokenizer, template, window)
            question, w = f.id.rsplit(SEP, 1)
            f = replace(f, window_of=(question, asked.chosen[question].index(int(w))))
            if parts[window] is not None:
                f = replace(f, n_context=common_prefix(parts[window], f.input_ids[:f.n_prompt]))
        marked.append(f)
    return marked


def windows_of(asked: Plan) -> list[str]:
    """The texts of every window of the plan's long passages, in document order."""
    return [context[s:e] for context, spans in asked.spans.items() for s, e in spans]


def gather(asked: Plan, answers: dict[str, str], probs: dict[str, float], settings: DecodeSettings) -> Read:
    """Each question's answer from what its questions were answered, by id (one chosen across windows)."""
    result = Read()
    for ex in asked.examples:
        if ex.id not in asked.long:
            if ex.id in answers:
                result.answers[ex.id], result.na_probs[ex.id] = answers[ex.id], probs[ex.id]
            continue
        _choose(ex, asked.chosen[ex.id], asked.spans[ex.context], answers, probs, result)
    if asked.long:
        result.documents = len(asked.spans)
        result.windows = sum(len(w) for w in asked.spans.values())
        result.window_questions = sum(len(w) for w in asked.chosen.values())
        log(f"{len(asked.long)} question(s) about {result.documents} passage(s) longer than a window ({asked.size} "
            f"tokens) read in windows: {result.windows} windows, each question in at most "
            f"{settings.windows_per_question} ({result.window_questions} question-windows)")
    return result


def read(model, tokenizer, examples: list[Example], settings: DecodeSettings, device, precision: str, *,
         progress: bool = False, route: dict | None = None) -> Read:
    """Every question's answer: those whose passage fits a window as ``predict`` gives them, the others
    read in their passage's windows and chosen across them (the module's docstring)."""
    asked = plan(tokenizer, examples, settings)
    features, stats = build_eval_features(tokenizer, asked.asked, settings.template, settings.max_length,
                                          settings.max_new_tokens)
    features = mark_windows(tokenizer, features, asked, settings.template)
    probs: dict[str, float] = {}
    # a window is read once, by the first batch that asks it, however many batches ask it after
    answers = predict(model, tokenizer, features, settings, device, precision,
                      contexts={ex.id: ex.context for ex in asked.asked}, na_probs=probs, progress=progress,
                      route=route, passages=PassageStore() if asked.long else None)
    result = gather(asked, answers, probs, settings)
    result.stats = stats
    stats.examples = len(examples)
    return result


def _choose(ex: Example, chosen: list[int], windows: list[tuple[int, int]], answers: dict[str, str],
            probs: dict[str, float], result: Read) -> None:
    """The answer of the window least likely to hold none, among those that answered (else "")."""
    read_in = [(w, answers[f"{ex.id}{SEP}{w}"], probs[f"{ex.id}{SEP}{w}"]) for w in chosen
               if f"{ex.id}{SEP}{w}" in answers]
    if not read_in:
        return  # no window could be asked: the question was dropped (counted)
    result.na_probs[ex.id] = min(p for _, _, p in read_in)
    answered = [r for r in read_in if r[1]]
    w, answer, p = min(answered or read_in, key=lambda r: (r[2], chosen.index(r[0])))
    s, e = windows[w]
    at = ex.context[s:e].find(answer) if answer else -1
    result.answers[ex.id] = answer
    result.sources[ex.id] = Source(w, s, e, 1.0 - p, s + at if at >= 0 else None,
                                   s + at + len(answer) if at >= 0 else None, len(read_in))


def where(row: dict) -> str:
    """Where a document's answer came from, in words."""
    if row["no_answer"]:
        return "not found in the document" + (f" ({row['windows_read']} windows read)" if "windows_read" in row else "")
    place = f"characters {row['start']}-{row['end']}" if row.get("start") is not None else "not a span of the document"
    page = f", page {row['page']}" if row.get("page") else ""
    window = f", window {row['window']} (characters {row['window_start']}-{row['window_end']}, score " \
             f"{row['score']:.3f})" if "window" in row else ""
    return f"from {place}{page}{window}"


def answer_row(example, answer: str | None, document=None, source=None) -> dict:
    """One line of ``ask --input``'s output: the answer, or why there is none; for a ``--document``,
    where it came from (character offsets, page, the window and its score)."""
    row = {"id": example.id, "question": example.question, "answer": answer, "no_answer": answer == ""}
    if answer is None:
        row["error"] = "not answered: the question does not fit the model's window, even with no passage"
    if document is None or not answer:
        return {**row, **({"windows_read": source.windows_read} if source is not None and answer == "" else {})}
    if source is not None:
        row.update({"start": source.start, "end": source.end, "window": source.window,
                    "window_start": source.window_start, "window_end": source.window_end,
                    "score": round(source.score, 4), "windows_read": source.windows_read})
    else:  # the document fit one window
        at = example.context.find(answer)
        row.update({"start": at if at >= 0 else None, "end": at + len(answer) if at >= 0 else None})
    row["page"] = document.page_of(row["start"])
    return row
