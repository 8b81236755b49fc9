"""SQuAD v1.1 (official JSON file, or the hub's ``rajpurkar/squad``) -> a flat list of Examples.

A malformed file is rejected whole, with an error naming the file, the question id and the field:
a record that breaks the format means the file is not what the user thinks it is, and dropping
such records silently would change the score's denominator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

HUB_DATASET = "rajpurkar/squad"


class DataError(ValueError):
    """Bad input data; the message names the file, record and field."""


@dataclass(frozen=True)
class Example:
    id: str
    title: str
    context: str
    question: str
    answers: tuple[str, ...]  # every gold answer, in file order (duplicates kept, as in SQuAD)
    answer_starts: tuple[int, ...] = field(default=())  # character offsets into context

    @property
    def answer(self) -> str:
        """The training target: the first gold answer."""
        return self.answers[0]


def _require(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object, got {type(obj).__name__}")
    if key not in obj:
        raise DataError(f"{where}: missing field '{key}'")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field '{key}' must be {names}, got {type(value).__name__}")
    return value


def parse_squad(obj: Any, source: str) -> list[Example]:
    """Flatten an official-format SQuAD v1.1 object; ``source`` names it in errors."""
    examples: list[Example] = []
    seen: set[str] = set()
    for a, article in enumerate(_require(obj, "data", list, source)):
        where_a = f"{source}: data[{a}]"
        title = _require(article, "title", str, where_a)
        for p, paragraph in enumerate(_require(article, "paragraphs", list, where_a)):
            where_p = f"{where_a}.paragraphs[{p}]"
            context = _require(paragraph, "context", str, where_p)
            if not context.strip():
                raise DataError(f"{where_p}: field 'context' is empty")
            for q, qa in enumerate(_require(paragraph, "qas", list, where_p)):
                qid = _require(qa, "id", str, f"{where_p}.qas[{q}]")
                where = f"{source}: question {qid}"
                if qid in seen:
                    raise DataError(f"{where}: duplicate question id")
                seen.add(qid)
                question = _require(qa, "question", str, where)
                if not question.strip():
                    raise DataError(f"{where}: field 'question' is empty")
                answers = _require(qa, "answers", list, where)
                if not answers:
                    raise DataError(f"{where}: field 'answers' is empty (SQuAD v1.1 has no unanswerable questions)")
                texts, starts = [], []
                for i, ans in enumerate(answers):
                    text = _require(ans, "text", str, f"{where}, answers[{i}]")
                    start = _require(ans, "answer_start", int, f"{where}, answers[{i}]")
                    if not text.strip():
                        raise DataError(f"{where}, answers[{i}]: field 'text' is empty")
                    if context[start : start + len(text)] != text:
                        raise DataError(
                            f"{where}, answers[{i}]: field 'answer_start'={start} does not point at "
                            f"{text!r} (context there: {context[start:start + len(text)]!r})")
                    texts.append(text)
                    starts.append(start)
                examples.append(Example(qid, title, context, question, tuple(texts), tuple(starts)))
    return examples


def load_squad_file(path: str | Path) -> list[Example]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    return parse_squad(obj, str(path))


def examples_from_rows(rows: Iterable[dict[str, Any]], source: str) -> list[Example]:
    """Rows in the hub's flat layout: id, title, context, question, answers{text, answer_start}."""
    data: dict[tuple[str, str], dict[str, Any]] = {}
    articles: dict[str, dict[str, Any]] = {}
    for row in rows:
        article = articles.setdefault(row["title"], {"title": row["title"], "paragraphs": []})
        key = (row["title"], row["context"])
        if key not in data:
            data[key] = {"context": row["context"], "qas": []}
            article["paragraphs"].append(data[key])
        answers = [{"text": t, "answer_start": s}
                   for t, s in zip(row["answers"]["text"], row["answers"]["answer_start"])]
        data[key]["qas"].append({"id": row["id"], "question": row["question"], "answers": answers})
    return parse_squad({"data": list(articles.values())}, source)


def load_squad_hub(split: str) -> list[Example]:
    """SQuAD v1.1 from the Hugging Face hub (needs network access the first time)."""
    import datasets

    rows = datasets.load_dataset(HUB_DATASET, split=split)
    return examples_from_rows(rows, f"{HUB_DATASET}[{split}]")


def load_examples(path: str | None, split: str, limit: int | None = None) -> list[Example]:
    """A local file when ``path`` is given, else the hub's ``split``; then the first ``limit``."""
    examples = load_squad_file(path) if path else load_squad_hub(split)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise DataError(f"{path or HUB_DATASET}: no questions left to use")
    return examples

