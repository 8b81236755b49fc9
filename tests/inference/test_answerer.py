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
