"""kill -9 in the middle of training, resume with the same command: the same weights as never stopped."""

import ctypes.util
import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from conftest import SQUAD
from loraqa.runtime import allocator


# MKL's fp32 matmul may take another code path for differently aligned buffers (AVX-512 CPUs), and a
# resumed process allocates differently: strict CNR mode pins the bits this test compares. One
# thread: how kernels split their work among threads must not decide them either (with two threads
# about one run in six to ten differed on this project's Xeon; with one, 24 runs in a row matched)
ENV = {**os.environ, "MKL_CBWR": "AUTO,STRICT", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _command(model_dir, out):
    return [sys.executable, "-m", "loraqa.cli", "train", "--model", str(model_dir), "--train-file", str(SQUAD),
            "--eval-file", str(SQUAD), "--output-dir", str(out), "--epochs", "8", "--batch-size", "2",
            "--lr", "1e-2", "--max-length", "128", "--max-new-tokens", "4", "--save-steps", "1", "--precision", "fp32", "--quiet"]


def test_sigkill_mid_training_then_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    reference = subprocess.run(_command(tiny_model_dir, tmp_path / "ref"), capture_output=True, text=True, timeout=300,
                               env=ENV)
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(_command(tiny_model_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and not any((out / "checkpoints").glob("step-*")):
        time.sleep(0.01)
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # no handler runs: whatever was being written stays half-written
    proc.wait()
    assert not (out / "metrics.json").exists(), "the run finished before the kill; make it longer"
    steps = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert steps, "no checkpoint before the kill"

    resumed = subprocess.run(_command(tiny_model_dir, out), capture_output=True, text=True, timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr, (steps, resumed.stderr[-3000:])
    a = load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    assert (tmp_path / "ref" / "predictions.json").read_text() == (out / "predictions.json").read_text()
    if ctypes.util.find_library("jemalloc") and allocator() == "glibc" and "LORAQA_ALLOCATOR" not in os.environ:
        assert json.loads((out / "metrics.json").read_text())["allocator"] == "jemalloc"  # runtime.py
    ref_history = (tmp_path / "ref" / "history.jsonl").read_text().splitlines()
    new_history = (out / "history.jsonl").read_text().splitlines()
    assert len(ref_history) == len(new_history) == 8
