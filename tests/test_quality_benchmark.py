"""benchmarks/quality.py end to end on the tiny model: a row per recipe, resumable, reused."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import FIXTURES

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


def test_quality_rows_are_appended_and_finished_runs_reused(tiny_model_dir, tmp_path):
    data = str(FIXTURES / "tiny-squad.json")
    cmd = [sys.executable, str(SCRIPT), "--model", str(tiny_model_dir), "--train-file", data, "--eval-file", data,
           "--recipes", "tiny", "--set", "tiny:r=2;lr=1e-2;max_length=256;max_new_tokens=4;group_by_passage=true",
           "--output-dir", str(tmp_path), "--quiet"]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["recipe"] for r in rows] == ["tiny"] and rows[0]["n_questions"] == 6
    assert rows[0]["settings"]["group_by_passage"] is True and rows[0]["trainable_params"] > 0
    assert "| tiny | 6 |" in first.stdout
    adapter = tmp_path / "tiny" / "adapter" / "adapter_model.safetensors"
    made = adapter.stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0 and "loraqa train" not in again.stderr  # reused, not retrained
    assert adapter.stat().st_mtime_ns == made
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 1  # the row replaced, not repeated
