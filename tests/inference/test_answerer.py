"""ask: answers one question or a file of them with a model and an adapter."""

import json

from conftest import make_adapter
from loraqa.cli import main


def test_ask_one_and_many(tiny_model_dir, tmp_path, capsys):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    common = ["--model", str(tiny_model_dir), "--adapter", str(adapter), "--max-new-tokens", "5", "--precision", "fp32"]
    assert main(["ask", *common, "--context", "The mill was rebuilt in 1887.", "--question", "When?"]) == 0
    single = capsys.readouterr().out.rstrip("\n")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "a", "context": "The mill was rebuilt in 1887.", "question": "When?"}) + "\n"
                         + json.dumps({"context": "Denver won.", "question": "Who won?"}) + "\n")
    assert main(["ask", *common, "--input", str(questions), "--output", str(tmp_path / "a.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "2"]
    assert rows[0]["answer"] == single  # batched answers equal the one-question answer


def test_ask_needs_a_question_and_a_context(tiny_model_dir, capsys):
    assert main(["ask", "--model", str(tiny_model_dir), "--question", "Who?"]) == 2
    assert "give --question with --context" in capsys.readouterr().err


def test_ask_about_a_document_says_where_each_answer_came_from(tiny_model_dir, tmp_path, capsys):
    from conftest import LONG_DOCUMENT as DOCUMENT
    from conftest import pdf_bytes

    common = ["--model", str(tiny_model_dir), "--max-new-tokens", "4", "--precision", "fp32", "--window-tokens", "120",
              "--doc-stride", "30"]
    (tmp_path / "mill.txt").write_text(DOCUMENT)
    assert main(["ask", *common, "--document", str(tmp_path / "mill.txt"), "--question", "When was the mill rebuilt?"]) == 0
    out, err = capsys.readouterr()
    assert "[loraqa] " in err and ("window " in err or "not found in the document" in err)
    assert "question(s) about 1 passage(s) longer than a window" in err
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "When was the mill rebuilt?"}) + "\n"
                         + json.dumps({"id": "who", "question": "Who rebuilt the mill?"}) + "\n")
    assert main(["ask", *common, "--document", str(tmp_path / "mill.txt"), "--input", str(questions)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in rows] == ["1", "who"] and rows[0]["answer"] == out.rstrip("\n")
    for row in rows:
        assert row["windows_read"] == 3
        if row["answer"]:
            assert {"window", "window_start", "window_end", "score", "page"} <= set(row)
            if row["start"] is not None:
                assert DOCUMENT[row["start"]:row["end"]] == row["answer"]
    # a PDF: the page of the answer; a line of context with --document is refused
    (tmp_path / "mill.pdf").write_bytes(pdf_bytes(["The mill was rebuilt in 1887.", "The Muller family rebuilt it."]))
    assert main(["ask", *common, "--document", str(tmp_path / "mill.pdf"), "--input", str(questions)]) == 0
    assert all(r.get("page") in (None, 1, 2) for r in map(json.loads, capsys.readouterr().out.splitlines()))
    questions.write_text(json.dumps({"question": "When?", "context": "x"}) + "\n")
    assert main(["ask", *common, "--document", str(tmp_path / "mill.txt"), "--input", str(questions)]) == 2
    assert "field 'context' with --document" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert main(["ask", *common, "--document", str(tmp_path / "empty.txt"), "--question", "When?"]) == 2
    err = capsys.readouterr().err
    assert "the file is empty" in err and len(err.strip().splitlines()) == 1
