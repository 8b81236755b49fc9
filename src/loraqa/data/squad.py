"""SQuAD's nested JSON (v1.1 and v2.0) -> a flat list of Examples.

A malformed file is rejected whole, with an error naming the file, the question id and the field:
a record that breaks the format means the file is not what the user thinks it is, and dropping
such records silently would change the score's denominator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraqa.data.examples import DataError, Example, read_text
from loraqa.data.records import to_examples


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


def is_v2(obj: Any) -> bool:
    """Whether a SQuAD JSON object says it is v2.0 (which has unanswerable questions)."""
    return isinstance(obj, dict) and obj.get("version") in ("v2.0", "2.0")


def _spans(answers: list, context: str, where: str, key: str) -> tuple[list[str], list[int]]:
    """Texts and starts of ``answers`` (or ``plausible_answers``), each checked against the context."""
    texts, starts = [], []
    for i, ans in enumerate(answers):
        text = _require(ans, "text", str, f"{where}, {key}[{i}]")
        start = _require(ans, "answer_start", int, f"{where}, {key}[{i}]")
        if not text.strip():
            raise DataError(f"{where}, {key}[{i}]: field 'text' is empty")
        if start < 0 or context[start : start + len(text)] != text:
            raise DataError(
                f"{where}, {key}[{i}]: field 'answer_start'={start} does not point at "
                f"{text!r} (context there: {context[start:start + len(text)]!r})")
        texts.append(text)
        starts.append(start)
    return texts, starts


def parse_squad(obj: Any, source: str, *, allow_unanswerable: bool = False) -> list[Example]:
    """Flatten an official-format SQuAD v1.1 or v2.0 object; ``source`` names it in errors.

    Questions without answers (v2.0's ``is_impossible``) are kept, with ``answers == ()``, when the
    file says v2.0 or ``allow_unanswerable`` is set; v2.0's ``plausible_answers`` are checked like
    answers but never used as gold.
    """
    allow_unanswerable = allow_unanswerable or is_v2(obj)
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
                if not answers and not allow_unanswerable:
                    raise DataError(f"{where}: field 'answers' is empty (SQuAD v1.1 has no unanswerable questions; "
                                    "--allow-unanswerable or a v2.0 file allows them)")
                impossible = qa.get("is_impossible", False)
                if not isinstance(impossible, bool):
                    raise DataError(f"{where}: field 'is_impossible' must be bool, got {type(impossible).__name__}")
                if impossible and answers:
                    raise DataError(f"{where}: 'is_impossible' is true but field 'answers' is not empty")
                if "plausible_answers" in qa:
                    _spans(_require(qa, "plausible_answers", list, where), context, where, "plausible_answers")
                texts, starts = _spans(answers, context, where, "answers")
                examples.append(Example(qid, title, context, question, tuple(texts), tuple(starts)))
    return examples


def load_squad_file(path: str | Path, columns: dict[str, str] | None = None, *,
                    allow_unanswerable: bool = False) -> list[Example]:
    """SQuAD v1.1/v2.0 JSON (``.json`` or ``.json.gz``); a top-level array is read as flat records."""
    path = Path(path)
    try:
        obj = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if isinstance(obj, list):
        return to_examples(((f"row {i}", row) for i, row in enumerate(obj)), str(path), columns,
                           allow_unanswerable=allow_unanswerable)
    if columns:
        raise DataError(f"{path}: --columns maps the columns of flat records, and SQuAD's nested JSON has none")
    return parse_squad(obj, str(path), allow_unanswerable=allow_unanswerable)


def squad_version(path: str | Path) -> str | None:
    """The ``version`` of a nested SQuAD JSON file ("" when it has none); None for other formats."""
    path = Path(path)
    if not path.name.lower().endswith((".json", ".json.gz")):
        return None
    try:
        obj = json.loads(read_text(path))
    except (DataError, json.JSONDecodeError):
        return None  # loading the file reports why
    return str(obj.get("version", "")) if isinstance(obj, dict) else None
