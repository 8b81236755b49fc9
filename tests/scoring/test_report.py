import json
import subprocess
import sys

import pytest
import yaml

from loraqa.scoring.report import load_run, markdown_table, summary_rows, write_report


def _run(folder, method, em, f1, trainable, history):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"method": method, "lr": 2e-4}))
    analysis = {"empty_prediction_share": 0.25, "not_in_context_share": 0.5,
                "by_question_type": {"what": {"n": 3, "exact_match": em, "f1": f1}},
                "by_answer_words": {"1": {"n": 3, "exact_match": em, "f1": f1}},
                "by_context_words": {"0-99": {"n": 3, "exact_match": em, "f1": f1}},
                "worst": [{"id": "x", "question": "What?", "prediction": "", "golds": ["a"], "f1": 0.0, "context": "ctx"}]}
    metrics = {"method": method, "exact_match": em, "f1": f1, "n_questions": 3, "trainable_params": trainable,
               "total_params": 1000, "trainable_percent": 100 * trainable / 1000, "peak_memory_mb": 512.0,
               "train_seconds": 10.0 if history else None, "eval_seconds": 2.0, "analysis": analysis}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    steps = [{"step": 10 * (i + 1), "epoch": 1 + i // 2, "train_loss": 3.0 - 0.3 * i, "lr": 1e-4} for i in range(4)]
    if history:
        (folder / "steps.jsonl").write_text("".join(json.dumps(p) + "\n" for p in steps))
    return folder


@pytest.fixture()
def runs(tmp_path):
    return [_run(tmp_path / "zero-shot", "zero-shot", 10.0, 20.0, 0, []),
            _run(tmp_path / "lora", "lora", 40.0, 55.5, 8, [{"epoch": 1, "train_loss": 2.0, "eval_loss": 2.5},
                                                             {"epoch": 2, "train_loss": 1.5, "eval_loss": 2.25}])]


def test_table_rows_come_from_the_files(runs):
    loaded = [load_run(r) for r in runs]
    assert [len(r["steps"]) for r in loaded] == [0, 4]
    rows = summary_rows(loaded)
    assert [r["run"] for r in rows] == ["zero-shot", "lora"]
    assert rows[1]["final_eval_loss"] == 2.25 and rows[0]["final_eval_loss"] is None
    table = markdown_table(rows).splitlines()
    assert table[2].startswith("| zero-shot | zero-shot | – | 0 | 0.00% | 512 | – | 2 |")
    assert table[3].startswith("| lora | lora | 0.0002 | 8 | 0.80% |")
    assert "| 1.500 / 2.250 | 40.00 | 55.50 | 3 |" in table[3]


def test_report_writes_markdown_and_plots_without_torch(runs, tmp_path):
    out = tmp_path / "report"
    code = ("import sys; from loraqa.cli import main; rc = main(['report', *sys.argv[1:]]); "
            "assert 'torch' not in sys.modules, 'report imported torch'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, runs), "--output-dir", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text()
    assert "![loss.png](loss.png)" in text and "![bars.png](bars.png)" in text
    assert "| what | 20.0 (3) | 55.5 (3) |" in text
    for png in ("loss.png", "bars.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_without_metrics_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no metrics.json"):
        write_report([tmp_path], tmp_path / "out")
