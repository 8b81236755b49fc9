"""Which reader reads a file (by its name's ending), the hub's datasets, ask's question files, and
the SQuAD sample that ships in the package."""

from __future__ import annotations

import json
from pathlib import Path

from loraqa.data import records
from loraqa.data.examples import DataError, Example
from loraqa.data.squad import load_squad_file

HUB_DATASET = "rajpurkar/squad"
FORMATS = ("SQuAD v1.1 JSON (.json, .json.gz), JSON Lines (.jsonl), CSV (.csv), Parquet (.parquet) "
           "or a folder written by datasets' save_to_disk")


def load_file(path: str | Path, split: str, columns: dict[str, str] | None = None, *,
              allow_unanswerable: bool = False) -> list[Example]:
    """Any of ``FORMATS``, told apart by the name's ending; ``split`` picks from a DatasetDict folder."""
    path = Path(path)
    name = path.name.lower()
    allow = {"allow_unanswerable": allow_unanswerable}
    if name.endswith((".json", ".json.gz")):
        return load_squad_file(path, columns, **allow)
    if name.endswith((".jsonl", ".jsonl.gz")):
        return records.read_jsonl(path, columns, **allow)
    if name.endswith((".csv", ".csv.gz")):
        return records.read_csv(path, columns, **allow)
    if name.endswith(".parquet"):
        return records.read_parquet(path, columns, **allow)
    if path.is_dir():
        return records.read_folder(path, split, columns, **allow)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    raise DataError(f"{path}: unknown format; give {FORMATS}")


def load_examples(path: str | None, split: str, limit: int | None = None, *, dataset: str | None = None,
                  columns: dict[str, str] | None = None, allow_unanswerable: bool = False) -> list[Example]:
    """``path`` when given, else the hub ``dataset``'s ``split`` (rajpurkar/squad); then the first ``limit``."""
    if path:
        examples = load_file(path, split, columns, allow_unanswerable=allow_unanswerable)
    else:
        examples = records.read_hub(dataset or HUB_DATASET, split, columns, allow_unanswerable=allow_unanswerable)
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


def read_questions(path: str, document: str | None = None) -> list[Example]:
    """JSONL, one {"context": ..., "question": ..., "id"?: ...} per line; a line without an id is
    called by its number. Ids must be unique (two answers under one id would be one). With a
    ``document``, the lines are {"question": ..., "id"?: ...}, each asked about it."""
    examples, lines_of = [], {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
        except ValueError as e:  # an integer of more digits than Python converts
            raise DataError(f"{path}: line {n}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {n}: not a JSON object but {type(row).__name__}; "
                            'each line is {"context": ..., "question": ..., "id"?: ...}')
        if document is not None and "context" in row:
            raise DataError(f"{path}: line {n}: field 'context' with --document (the document is every question's)")
        for key in ("question",) if document is not None else ("context", "question"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise DataError(f"{path}: line {n}: field '{key}' must be a non-empty string")
        if "id" in row and (not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool)):
            raise DataError(f"{path}: line {n}: field 'id' must be a string or an integer")
        qid = str(row.get("id", n))
        if qid in lines_of:
            first, explicit = lines_of[qid]
            whose = f"line {first}'s id" if explicit else f"line {first}'s number (a line without an id is called by it)"
            raise DataError(f"{path}: line {n}: id {qid!r} is also {whose}; ids must be unique")
        lines_of[qid] = (n, "id" in row)
        examples.append(Example(qid, "", row["context"] if document is None else document, row["question"], ()))
    if not examples:
        raise DataError(f"{path}: no questions")
    return examples
