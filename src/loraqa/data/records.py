"""Flat records (JSON Lines, CSV, Parquet, a ``save_to_disk`` folder, a hub dataset) -> Examples.

Every format is read as rows in the hub ``squad`` schema: ``id``, ``title``, ``context``,
``question``, ``answers`` = ``{"text": [...], "answer_start": [...]}`` (JSON text in CSV), or a plain
``answer`` string whose start is its first occurrence in the context. ``--columns`` maps other
column names onto these fields; other columns are ignored.

Rows are checked as strictly as SQuAD JSON (``squad.parse_squad``): a bad row is an error naming the
file, the row and the field, never a silent drop. Text files name rows by ``line N`` (from 1, as an
editor shows them; a CSV record by the line it starts on), tables by ``row N`` (from 0, as
``dataset[N]``). A row without an ``id`` gets one from its title, context and question, so the same
questions get the same ids in every format and in any order.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from loraqa.data.examples import DataError, Example, read_text
from loraqa.io import hub_refusal, hub_status

FIELDS = ("id", "title", "context", "question", "answers", "answer")
Rows = Iterable[tuple[str, Any]]  # (where the row is, e.g. "line 7"; the row)


def parse_columns(value: str | dict[str, str] | None) -> dict[str, str] | None:
    """``"question=query,context=passage"`` (or that dict) -> ``{loraqa field: your column}``."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"--columns takes FIELD=COLUMN pairs separated by commas, got {value!r}")
        value = {}
        for k, v in pairs:
            if k.strip() in value:
                raise ValueError(f"--columns maps {k.strip()!r} twice")
            value[k.strip()] = v.strip()
    if not isinstance(value, dict):
        raise ValueError(f"--columns must map fields to column names, got {type(value).__name__}")
    for k, v in value.items():
        if k not in FIELDS:
            raise ValueError(f"--columns: unknown field {k!r} (fields: {', '.join(FIELDS)})")
        if not isinstance(v, str) or not v:
            raise ValueError(f"--columns: field {k!r} needs a column name, got {v!r}")
    return dict(value)


def stable_id(title: str, context: str, question: str) -> str:
    """12 hex digits of SHA-1 over the question's own text: the same in every format and row order."""
    return hashlib.sha1(json.dumps([title, context, question]).encode("utf-8")).hexdigest()[:12]


def to_examples(rows: Rows, source: str, columns: dict[str, str] | None = None,
                header: Sequence[str] | None = None, *, allow_unanswerable: bool = False) -> list[Example]:
    """Check each ``(where, row)`` and convert it; ``header`` (a table's columns) is checked first.

    With ``allow_unanswerable``, empty ``answers`` lists (or an empty ``answer``) mean "no answer".
    """
    names = {f: f for f in FIELDS} | (parse_columns(columns) or {})
    if header is not None:
        _check_header(list(header), names, columns or {}, source)
    examples: list[Example] = []
    seen: dict[str, tuple[str, bool]] = {}  # id -> (where, made by stable_id)
    for where, row in rows:
        example, made = _example(row, names, f"{source}: {where}", allow_unanswerable)
        if example.id in seen:
            first, first_made = seen[example.id]
            if made and first_made:
                raise DataError(f"{source}: {where}: same title, context and question as {first} "
                                "(no 'id' tells them apart)")
            raise DataError(f"{source}: {where} (id {example.id}): duplicate id, first at {first}")
        seen[example.id] = (where, made)
        examples.append(example)
    return examples


def _check_header(header: list[str], names: dict[str, str], mapped: dict[str, str], source: str) -> None:
    present = f"its columns: {', '.join(header)}"
    for field, column in names.items():
        if field in mapped and column not in header:
            raise DataError(f"{source}: no column {column!r} (--columns {field}={column}); {present}")
    for field in ("context", "question"):
        if names[field] not in header:
            raise DataError(f"{source}: no column {names[field]!r}; {present} (map yours with --columns {field}=NAME)")
    if names["answers"] not in header and names["answer"] not in header:
        raise DataError(f"{source}: no column {names['answers']!r} or {names['answer']!r}; {present}")


def _get(row: dict, column: str) -> Any:
    """A cell, with None for missing, null and empty (CSV has no null, only the empty string)."""
    value = row.get(column)
    return None if value is None or (isinstance(value, str) and value == "") else value


def _name(names: dict[str, str], field: str) -> str:
    """The user's column, and loraqa's name for it when they differ: ``'query' (the question)``."""
    return repr(names[field]) if names[field] == field else f"{names[field]!r} (the {field})"


def _text(row: dict, names: dict[str, str], field: str, where: str) -> str:
    value = row.get(names[field])
    if value is None:
        raise DataError(f"{where}: missing field {_name(names, field)} (fields: {', '.join(map(str, row))})")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {_name(names, field)} must be str, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {_name(names, field)} is empty")
    return value


def _example(row: Any, names: dict[str, str], where: str, allow_unanswerable: bool = False) -> tuple[Example, bool]:
    """One row -> (its Example, whether its id was made by ``stable_id``)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with fields {', '.join(FIELDS)}, got {type(row).__name__}")
    qid = _get(row, names["id"])
    if isinstance(qid, int) and not isinstance(qid, bool):  # e.g. an integer column in Parquet
        qid = str(qid)
    elif qid is not None and not isinstance(qid, str):
        raise DataError(f"{where}: field {_name(names, 'id')} must be str, got {type(qid).__name__}")
    made = qid is None
    where = where if made else f"{where} (id {qid})"
    context, question = _text(row, names, "context", where), _text(row, names, "question", where)
    title = _get(row, names["title"])
    title = "" if title is None else title
    if not isinstance(title, str):
        raise DataError(f"{where}: field {_name(names, 'title')} must be str, got {type(title).__name__}")
    if made:
        qid = stable_id(title, context, question)
    texts, starts = _answers(row, names, context, where, allow_unanswerable)
    return Example(qid, title, context, question, texts, starts), made


def _answers(row: dict, names: dict[str, str], context: str, where: str,
             allow_unanswerable: bool = False) -> tuple[tuple, tuple]:
    """``answers`` (texts and starts, checked) or else ``answer`` (found in the context)."""
    value = _get(row, names["answers"])
    if value is None:
        answer = _get(row, names["answer"])
        if answer is None and allow_unanswerable and names["answer"] in row:  # an empty answer: none
            return (), ()
        if answer is None:
            raise DataError(f"{where}: no answer: give field {_name(names, 'answers')} or {_name(names, 'answer')}")
        if not isinstance(answer, str) or not answer.strip():
            raise DataError(f"{where}: field {_name(names, 'answer')} must be a non-empty str, got {answer!r}")
        start = context.find(answer)
        if start < 0:
            raise DataError(f"{where}: field {_name(names, 'answer')} {answer!r} is not in the context")
        return (answer,), (start,)
    where = f"{where}: field {_name(names, 'answers')}"
    if isinstance(value, str):  # CSV holds the object as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is not valid JSON (column {e.colno}: {e.msg})") from None
    if not (isinstance(value, dict) and isinstance(value.get("text"), list)
            and isinstance(value.get("answer_start"), list)):
        shown = json.dumps(value, default=str)
        raise DataError(f'{where} must be {{"text": [...], "answer_start": [...]}}, got {shown[:80]}')
    texts, starts = value["text"], value["answer_start"]
    if len(texts) != len(starts):
        raise DataError(f"{where} has {len(texts)} texts but {len(starts)} answer_starts")
    if not texts:
        if allow_unanswerable:
            return (), ()
        raise DataError(f"{where} is empty (SQuAD v1.1 has no unanswerable questions; "
                        "--allow-unanswerable accepts them)")
    for i, (text, start) in enumerate(zip(texts, starts)):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: text[{i}] must be a non-empty str, got {text!r}")
        if not isinstance(start, int) or isinstance(start, bool):
            raise DataError(f"{where}: answer_start[{i}] must be int, got {type(start).__name__}")
        if start < 0 or context[start:start + len(text)] != text:
            raise DataError(f"{where}: answer_start[{i}]={start} does not point at {text!r} "
                            f"(context there: {context[max(start, 0):max(start, 0) + len(text)]!r})")
    return tuple(texts), tuple(starts)


def _table(rows: Iterable[dict], header: Sequence[str], source: str, columns: dict | None,
           allow_unanswerable: bool = False) -> list[Example]:
    return to_examples(((f"row {i}", row) for i, row in enumerate(rows)), source, columns, header,
                       allow_unanswerable=allow_unanswerable)


def read_jsonl(path: Path, columns: dict[str, str] | None = None, *, allow_unanswerable: bool = False) -> list[Example]:
    """One JSON object per line; blank lines are skipped."""
    def rows() -> Rows:
        # split on "\n" only: JSON text may hold a raw U+2028, which str.splitlines would split on
        for n, line in enumerate(read_text(path).split("\n"), 1):
            if line.strip():
                try:
                    yield f"line {n}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {n}: not valid JSON (column {e.colno}: {e.msg})") from None
    return to_examples(rows(), str(path), columns, allow_unanswerable=allow_unanswerable)


def read_csv(path: Path, columns: dict[str, str] | None = None, *, allow_unanswerable: bool = False) -> list[Example]:
    """A header row, then one record per row; ``answers`` is JSON text."""
    reader = csv.DictReader(io.StringIO(read_text(path).removeprefix("\ufeff"), newline=""))  # Excel's BOM
    try:
        header = reader.fieldnames
    except csv.Error as e:
        raise DataError(f"{path}: line 1: not valid CSV: {e}") from None
    if not header:
        raise DataError(f"{path}: empty file (a CSV file starts with a header row)")

    def rows() -> Rows:
        start = reader.line_num + 1
        try:
            for row in reader:
                yield f"line {start}", row
                start = reader.line_num + 1
        except csv.Error as e:
            raise DataError(f"{path}: line {reader.line_num}: not valid CSV: {e}") from None
    return to_examples(rows(), str(path), columns, header, allow_unanswerable=allow_unanswerable)


def read_parquet(path: Path, columns: dict[str, str] | None = None, *,
                 allow_unanswerable: bool = False) -> list[Example]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, pyarrow.ArrowException) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    return _table(table.to_pylist(), table.column_names, str(path), columns, allow_unanswerable)


def read_folder(path: Path, split: str, columns: dict[str, str] | None = None, *,
                allow_unanswerable: bool = False) -> list[Example]:
    """A folder written by ``Dataset.save_to_disk``, or ``DatasetDict.save_to_disk`` (then ``split``)."""
    import datasets

    source = str(path)
    if (path / "dataset_dict.json").is_file():  # one sub-folder per split
        splits = json.loads(read_text(path / "dataset_dict.json")).get("splits", [])
        if split not in splits:
            raise DataError(f"{path}: holds the splits {', '.join(splits)}, not {split!r}; give one split's "
                            f"folder, e.g. {path / splits[0] if splits else path}")
        path, source = path / split, f"{path}[{split}]"
    elif not ((path / "state.json").is_file() or (path / "dataset_info.json").is_file()):
        raise DataError(f"{path}: a folder, but not one written by datasets' save_to_disk "
                        "(no state.json or dataset_dict.json)")
    try:
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise DataError(f"{source}: cannot load it with datasets.load_from_disk: {e}") from None
    return _table(dataset, dataset.column_names, source, columns, allow_unanswerable)


def read_hub(name: str, split: str, columns: dict[str, str] | None = None, *,
             allow_unanswerable: bool = False) -> list[Example]:
    """``split`` of a hub dataset in the ``squad`` schema (needs network access the first time)."""
    import datasets
    from huggingface_hub import constants

    source = f"{name}[{split}]"
    # offline by choice: datasets answers at once (from its cache, or no); else ask the hub once, quickly
    answer = None if constants.HF_HUB_OFFLINE else hub_status(name, "datasets")
    if answer is not None and answer.state == "unreachable":
        raise DataError(f"{source}: the Hugging Face hub is out of reach; give --train-file/--eval-file "
                        "(`loraqa quickstart` trains on the SQuAD sample that ships with loraqa)")
    if answer is not None and not answer.usable:
        raise DataError(hub_refusal(name, answer, "dataset"))
    try:
        dataset = datasets.load_dataset(name, split=split)
    except (OSError, ConnectionError, ValueError) as e:  # not found, offline, no such split
        raise DataError(f"{source}: cannot load it from the hub: {' '.join(str(e).split())}") from None
    return _table(dataset, dataset.column_names, source, columns, allow_unanswerable)
