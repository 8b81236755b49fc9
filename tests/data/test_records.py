"""Flat formats (JSON Lines, CSV, Parquet, save_to_disk folders) read to the same Examples as SQuAD JSON."""

import csv
import gzip
import json
from pathlib import Path

import pytest

from conftest import SQUAD
from loraqa.data.examples import DataError
from loraqa.data.load import load_examples
from loraqa.data.records import parse_columns, stable_id

FORMATS = ["json", "jsonl", "csv", "parquet", "folder"]


def as_rows(examples) -> list[dict]:
    """Examples as rows in the hub squad schema."""
    return [{"id": e.id, "title": e.title, "context": e.context, "question": e.question,
             "answers": {"text": list(e.answers), "answer_start": list(e.answer_starts)}} for e in examples]


def as_squad(rows: list[dict]) -> dict:
    """Rows back into SQuAD's nested JSON (rows of one passage are adjacent)."""
    articles: list[dict] = []
    for row in rows:
        if not articles or articles[-1]["title"] != row["title"]:
            articles.append({"title": row["title"], "paragraphs": []})
        paragraphs = articles[-1]["paragraphs"]
        if not paragraphs or paragraphs[-1]["context"] != row["context"]:
            paragraphs.append({"context": row["context"], "qas": []})
        answers = [{"text": t, "answer_start": s}
                   for t, s in zip(row["answers"]["text"], row["answers"]["answer_start"])]
        paragraphs[-1]["qas"].append({"id": row["id"], "question": row["question"], "answers": answers})
    return {"version": "1.1", "data": articles}


def write(rows: list[dict], folder: Path, kind: str, name: str = "q") -> Path:
    """``rows`` written as one of FORMATS (CSV holds nested values as JSON text)."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "json":
        path = folder / f"{name}.json"
        path.write_text(json.dumps(as_squad(rows)))
    elif kind == "jsonl":
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif kind == "csv":
        path = folder / f"{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()} for r in rows)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        datasets.disable_progress_bars()
        path = folder / f"{name}-dataset"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def where(kind: str, i: int) -> str:
    """How errors name row ``i`` (from 0): lines in text files (CSV after its header), rows in tables."""
    return {"jsonl": f"line {i + 1}", "csv": f"line {i + 2}"}.get(kind, f"row {i}")


@pytest.mark.parametrize("kind", FORMATS[1:])
def test_every_format_gives_the_squad_files_examples(kind, examples, tmp_path):
    path = write(as_rows(examples), tmp_path, kind)
    assert load_examples(str(path), "validation") == examples


def test_gzip_json_array_and_dataset_dict(examples, tmp_path):
    import datasets

    (tmp_path / "q.json.gz").write_bytes(gzip.compress(SQUAD.read_bytes()))
    (tmp_path / "array.json").write_text(json.dumps(as_rows(examples)))
    datasets.disable_progress_bars()
    datasets.DatasetDict({"train": datasets.Dataset.from_list(as_rows(examples[:2])),
                          "validation": datasets.Dataset.from_list(as_rows(examples))}).save_to_disk(tmp_path / "dd")
    for path in ("q.json.gz", "array.json", "dd"):
        assert load_examples(str(tmp_path / path), "validation") == examples
    assert load_examples(str(tmp_path / "dd"), "train") == examples[:2]
    with pytest.raises(DataError, match=r"dd: holds the splits train, validation, not 'test'; give one split's folder"):
        load_examples(str(tmp_path / "dd"), "test")


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_plain_answer_column_and_missing_ids(kind, examples, tmp_path):
    rows = [{"context": e.context, "question": e.question, "answer": e.answer} for e in examples]
    got = load_examples(str(write(rows, tmp_path, kind)), "validation")
    assert [(g.answers, g.answer_starts) for g in got] == [((e.answer,), (e.context.find(e.answer),)) for e in examples]
    assert [g.id for g in got] == [stable_id("", e.context, e.question) for e in examples]
    assert len(got[0].id) == 12 and got[0].title == ""
    # the same questions in another order and format get the same ids
    again = load_examples(str(write(rows[::-1], tmp_path, "parquet", "reversed")), "validation")
    assert [g.id for g in again] == [g.id for g in got][::-1]


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "folder"])
def test_column_mapping(kind, examples, tmp_path):
    rows = [{"qid": r["id"], "title": r["title"], "passage": r["context"], "query": r["question"],
             "answers": r["answers"], "extra": 1} for r in as_rows(examples)]
    path = write(rows, tmp_path, kind)
    columns = parse_columns("id=qid,question=query,context=passage")
    assert load_examples(str(path), "validation", columns=columns) == examples
    with pytest.raises(DataError) as err:
        load_examples(str(path), "validation", columns={"question": "ask", "context": "passage"})
    if kind == "jsonl":  # no header: the first row names what it has
        expected = "q.jsonl: line 1: missing field 'ask' (the question) (fields: qid, title, passage"
    else:
        expected = f"{path.name}: no column 'ask' (--columns question=ask); its columns: qid, title, passage"
    assert expected in str(err.value)


def test_bad_column_settings():
    with pytest.raises(ValueError, match="--columns: unknown field 'query'"):
        parse_columns("query=question")
    with pytest.raises(ValueError, match="--columns takes FIELD=COLUMN pairs"):
        parse_columns("question")


def _set(i, **fields):
    return lambda rows: rows[i].update(fields)


BAD = [  # (name, change to the rows, the field part of the message); each breaks row 1 (q2)
    ("empty question", _set(1, question=" "), "(id q2): field 'question' is empty"),
    ("answer_start off", lambda rows: rows[1]["answers"]["answer_start"].__setitem__(0, 5),
     "(id q2): field 'answers': answer_start[0]=5 does not point at"),
    ("answer lists differ", lambda rows: rows[1]["answers"]["answer_start"].append(0),
     "(id q2): field 'answers' has 2 texts but 3 answer_starts"),
    ("duplicate id", _set(1, id="q1"), "(id q1): duplicate id, first at"),
]


@pytest.mark.parametrize("kind", FORMATS[1:])
@pytest.mark.parametrize("name, change, message", BAD, ids=[b[0] for b in BAD])
def test_bad_rows_name_file_row_and_field(kind, name, change, message, examples, tmp_path):
    rows = as_rows(examples)
    change(rows)
    path = write(rows, tmp_path, kind)
    with pytest.raises(DataError) as err:
        load_examples(str(path), "validation")
    assert f"{path.name}: {where(kind, 1)} {message}" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_answer_not_in_context_is_an_error(kind, examples, tmp_path):
    rows = [{"id": e.id, "context": e.context, "question": e.question, "answer": e.answer} for e in examples]
    rows[2]["answer"] = "Green Bay Packers"
    with pytest.raises(DataError, match=rf"q\.{kind}: {where(kind, 2)} \(id q3\): field 'answer' 'Green Bay "
                                        r"Packers' is not in the context"):
        load_examples(str(write(rows, tmp_path, kind)), "validation")


def test_format_specific_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"context": "x"}\n\n[1]\n')
    with pytest.raises(DataError, match=r"a.jsonl: line 1: missing field 'question'"):
        load_examples(str(tmp_path / "a.jsonl"), "train")
    (tmp_path / "b.jsonl").write_text('{"context": "x", "question": "y", "answer": "x"}\n\n{oops\n')
    with pytest.raises(DataError, match=r"b.jsonl: line 3: not valid JSON"):
        load_examples(str(tmp_path / "b.jsonl"), "train")
    (tmp_path / "c.csv").write_text('context,question,answers\nab,q,"{""text"": [""a""]"\n')
    with pytest.raises(DataError, match=r"c.csv: line 2: field 'answers' is not valid JSON"):
        load_examples(str(tmp_path / "c.csv"), "train")
    (tmp_path / "d.csv").write_text("context,query,answer\nab,q,a\n")
    with pytest.raises(DataError, match=r"d.csv: no column 'question'; its columns: context, query, answer"):
        load_examples(str(tmp_path / "d.csv"), "train")
    (tmp_path / "e.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"e.parquet: not a readable Parquet file"):
        load_examples(str(tmp_path / "e.parquet"), "train")
    (tmp_path / "f.txt").write_text("hello")
    with pytest.raises(DataError, match=r"f.txt: unknown format; give SQuAD v1.1 JSON"):
        load_examples(str(tmp_path / "f.txt"), "train")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"folder: a folder, but not one written by datasets' save_to_disk"):
        load_examples(str(tmp_path / "folder"), "train")
    with pytest.raises(DataError, match=r"g.csv: no such file"):
        load_examples(str(tmp_path / "g.csv"), "train")


def test_same_question_twice_without_ids(tmp_path):
    row = {"context": "ab", "question": "q", "answer": "a"}
    (tmp_path / "twice.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"twice.jsonl: line 2: same title, context and question as line 1"):
        load_examples(str(tmp_path / "twice.jsonl"), "train")
