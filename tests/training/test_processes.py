"""Two CPU processes (torchrun + gloo) train and evaluate like one process with the same global batch."""

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import SQUAD, free_port


def test_two_processes_equal_one(tiny_model_dir, tmp_path):
    # no dropout anywhere: each process draws its own dropout masks, which one process would not;
    # fp32 pinned: on a CPU with native bf16, auto may choose bf16, whose rounding differs by batch split
    flags = ["train", "--model", str(tiny_model_dir), "--train-file", str(SQUAD), "--eval-file", str(SQUAD),
             "--epochs", "2", "--batch-size", "2", "--lr", "1e-2", "--max-length", "128", "--max-new-tokens", "6",
             "--lora-dropout", "0", "--model-dropout", "0", "--eval-batch-size", "2", "--precision", "fp32", "--quiet"]
    one = subprocess.run([sys.executable, "-m", "loraqa.cli", *flags, "--output-dir", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                          "-m", "loraqa.cli", *flags, "--output-dir", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-4000:]
    assert "2 process(es)" in two.stderr
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["n_questions"] == 6
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # the same updates, up to the order of float sums
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    history = [[json.loads(line) for line in (tmp_path / run / "history.jsonl").read_text().splitlines()]
               for run in ("one", "two")]
    for r1, r2 in zip(*history):
        assert abs(r1["train_loss"] - r2["train_loss"]) < 1e-4 and abs(r1["eval_loss"] - r2["eval_loss"]) < 1e-4
    predictions = [json.loads((tmp_path / run / "predictions.json").read_text()) for run in ("one", "two")]
    assert predictions[0] == predictions[1]


CLOSE = """
import torch.distributed as dist
from loraqa.training.processes import Processes
processes = Processes.from_environment()
assert processes.world == 2 and dist.is_initialized()
processes.close()
print("group up" if dist.is_initialized() else "group down", flush=True)
"""


def test_close_takes_the_process_group_down(tmp_path):
    # left to the interpreter's exit, gloo's threads can outlive it and abort a finished worker
    script = tmp_path / "close.py"
    script.write_text(CLOSE)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(free_port()), str(script)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("group down") == 2 and "group up" not in run.stdout, run.stdout
