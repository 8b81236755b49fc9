import json

import pytest

from conftest import SQUAD
from loraqa.cli import main
from loraqa.compare import parse_extra, plan_rows
from loraqa.config import Config


def test_parse_extra():
    assert parse_extra("lora-all:target_modules=c_attn,c_proj;r=16") == (
        "lora-all", {"method": "lora", "target_modules": "c_attn,c_proj", "r": 16})
    with pytest.raises(ValueError, match="expected NAME:key=value"):
        parse_extra("r=16")


def test_rows_share_everything_but_the_method(tmp_path):
    rows = plan_rows(Config(output_dir=str(tmp_path), epochs=2), ["zero-shot", "lora", "full"], ["r4:r=4"])
    assert list(rows) == ["zero-shot", "lora", "full", "r4"]
    assert rows["zero-shot"][0] == "evaluate" and rows["full"][1].method == "full"
    assert rows["r4"][1].r == 4 and rows["r4"][1].target_modules is None
    assert {c.epochs for _, c in rows.values()} == {2}
    with pytest.raises(ValueError, match="unknown qlora"):
        plan_rows(Config(), ["qlora"], [])


def test_compare_end_to_end_and_reuse(tiny_model_dir, tmp_path, capsys):
    args = ["compare", "--model", str(tiny_model_dir), "--train-file", str(SQUAD), "--eval-file", str(SQUAD),
            "--output-dir", str(tmp_path), "--epochs", "1", "--max-length", "128", "--max-new-tokens", "4",
            "--quiet"]
    assert main(args) == 0
    report = (tmp_path / "report.md").read_text()
    metrics = {m: json.loads((tmp_path / m / "metrics.json").read_text()) for m in ("zero-shot", "lora", "full")}
    assert metrics["lora"]["trainable_params"] == 2048
    assert metrics["full"]["trainable_params"] == metrics["full"]["total_params"] == metrics["lora"]["total_params"]
    assert metrics["zero-shot"]["trainable_params"] == 0
    assert all(m["peak_memory_mb"] > 0 for m in metrics.values())
    assert "| lora | lora | 0.0002 | 2,048 |" in report and "| full | full | 0.0002 |" in report
    capsys.readouterr()
    assert main(args) == 0  # everything is reused
    assert capsys.readouterr().err.count("reusing") == 3
