"""Question files and datasets -> a flat list of Examples; SQuAD v1.1's nested JSON is parsed here.

``load_examples`` picks the reader: SQuAD JSON here; JSON Lines, CSV, Parquet, ``save_to_disk``
folders and hub datasets (flat rows in the hub ``squad`` schema) in ``records.py``.
A malformed file is rejected whole, with an error naming the file, the question id and the field:
a record that breaks the format means the file is not what the user thinks it is, and dropping
such records silently would change the score's denominator.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

HUB_DATASET = "rajpurkar/squad"
FORMATS = ("SQuAD v1.1 JSON (.json, .json.gz), JSON Lines (.jsonl), CSV (.csv), Parquet (.parquet) "
           "or a folder written by datasets' save_to_disk")


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
                    if start < 0 or context[start : start + len(text)] != text:
                        raise DataError(
                            f"{where}, answers[{i}]: field 'answer_start'={start} does not point at "
                            f"{text!r} (context there: {context[start:start + len(text)]!r})")
                    texts.append(text)
                    starts.append(start)
                examples.append(Example(qid, title, context, question, tuple(texts), tuple(starts)))
    return examples


def read_text(path: Path) -> str:
    """A UTF-8 text file, gunzipped first when its name ends in ``.gz``."""
    try:
        raw = path.read_bytes()
        return (gzip.decompress(raw) if path.name.endswith(".gz") else raw).decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip's errors are OSError or EOFError
        raise DataError(f"{path}: cannot read: {e}") from None


def load_squad_file(path: str | Path, columns: dict[str, str] | None = None) -> list[Example]:
    """SQuAD v1.1 JSON (``.json`` or ``.json.gz``); a top-level array is read as flat records."""
    path = Path(path)
    try:
        obj = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if isinstance(obj, list):
        from loraqa.records import to_examples

        return to_examples(((f"row {i}", row) for i, row in enumerate(obj)), str(path), columns)
    if columns:
        raise DataError(f"{path}: --columns maps the columns of flat records, and SQuAD's nested JSON has none")
    return parse_squad(obj, str(path))


def examples_from_rows(rows: Iterable[dict[str, Any]], source: str) -> list[Example]:
    """Rows in the hub's flat layout: id, title, context, question, answers{text, answer_start}."""
    from loraqa.records import to_examples

    return to_examples(((f"row {i}", row) for i, row in enumerate(rows)), source)


def load_file(path: str | Path, split: str, columns: dict[str, str] | None = None) -> list[Example]:
    """Any of ``FORMATS``, told apart by the name's ending; ``split`` picks from a DatasetDict folder."""
    from loraqa import records

    path = Path(path)
    name = path.name.lower()
    if name.endswith((".json", ".json.gz")):
        return load_squad_file(path, columns)
    if name.endswith((".jsonl", ".jsonl.gz")):
        return records.read_jsonl(path, columns)
    if name.endswith((".csv", ".csv.gz")):
        return records.read_csv(path, columns)
    if name.endswith(".parquet"):
        return records.read_parquet(path, columns)
    if path.is_dir():
        return records.read_folder(path, split, columns)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    raise DataError(f"{path}: unknown format; give {FORMATS}")


def load_examples(path: str | None, split: str, limit: int | None = None, *, dataset: str | None = None,
                  columns: dict[str, str] | None = None) -> list[Example]:
    """``path`` when given, else the hub ``dataset``'s ``split`` (rajpurkar/squad); then the first ``limit``."""
    if path:
        examples = load_file(path, split, columns)
    else:
        from loraqa.records import read_hub

        examples = read_hub(dataset or HUB_DATASET, split, columns)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise DataError(f"{path or dataset or HUB_DATASET}: no questions left to use")
    return examples


def sample_file(split: str) -> Path:
    """The SQuAD v1.1 sample shipped in the package: "train" (1,001 questions) or "eval" (302)."""
    from importlib.resources import files

    if split not in ("train", "eval"):
        raise ValueError(f"sample split must be 'train' or 'eval', got {split!r}")
    return Path(str(files("loraqa") / "samples" / f"squad-{split}.json.gz"))
