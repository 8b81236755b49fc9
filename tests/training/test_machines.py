"""Several machines, stood in for by two torchrun agents on 127.0.0.1 (c10d rendezvous, gloo, one
process each, one run folder as on a shared filesystem): the same run as one machine with two
processes; and a machine lost mid-epoch costs a restart, not the run. Every run is bounded in time."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SQUAD, free_port

TIMEOUT = 240  # seconds any one launch may take
# a fresh rendezvous store each round: torchrun's shared one keeps the last round's keys, and a
# restarted worker may read its lost peer's old address from them (docs/machines.md)
# one thread each everywhere: torchrun sets OMP_NUM_THREADS=1 for several processes a machine and
# leaves it alone for one, and another thread count sums a product in another order (the last bits
# of an adapter differed on a 2-core AMD EPYC)
AGENT_ENV = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1"}


def _flags(model_dir, out: Path, epochs: int = 2) -> list[str]:
    # dropout off: each process draws its own masks; fp32 pinned: bf16's rounding differs by batch split
    return ["-m", "loraqa.cli", "train", "--model", str(model_dir), "--train-file", str(SQUAD), "--eval-file",
            str(SQUAD), "--epochs", str(epochs), "--batch-size", "2", "--lr", "1e-2", "--max-length", "128",
            "--max-new-tokens", "6", "--lora-dropout", "0", "--model-dropout", "0", "--eval-batch-size", "2",
            "--precision", "fp32", "--save-steps", "1", "--quiet", "--output-dir", str(out)]


def _agents(flags: list[str], logs: Path, max_restarts: int = 0) -> list[subprocess.Popen]:
    """Two torchrun agents, one process each, meeting at a c10d rendezvous on 127.0.0.1; each
    writes its output (and its workers') to ``logs/agent-N.log``: a file, not a pipe, that a
    worker outliving its agent cannot hold open."""
    endpoint = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", f"loraqa-{endpoint}",
               "--max-restarts", str(max_restarts), "--monitor-interval", "0.5", *flags]
    logs.mkdir(parents=True, exist_ok=True)
    agents = []
    for n in range(2):
        with open(logs / f"agent-{n}.log", "w") as log:
            agents.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=AGENT_ENV))
        agents[-1].log = logs / f"agent-{n}.log"
    return agents


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid] + [p for c in children for p in _tree(int(c))]


def _finish(agents: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """(exit code, output) of each agent; what still runs ``TIMEOUT`` seconds on is killed, workers too."""
    deadline = time.monotonic() + TIMEOUT
    for agent in agents:
        try:
            agent.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for pid in reversed(_tree(agent.pid)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            agent.wait()
    return [(agent.returncode, agent.log.read_text()) for agent in agents]


def _adapter(out: Path) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _same_adapter(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def two_machines(tiny_model_dir, tmp_path_factory):
    """An unstopped run on two agents: (run folder, each agent's stderr)."""
    out = tmp_path_factory.mktemp("two-machines") / "run"
    results = _finish(_agents(_flags(tiny_model_dir, out, epochs=4), out.parent / "logs"))
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    return out, [err for _, err in results]


def test_two_machines_train_as_one_machine_with_two_processes(two_machines, tiny_model_dir, tmp_path):
    out, logs = two_machines
    one = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(free_port()), *_flags(tiny_model_dir, tmp_path / "one",
                                                                                    epochs=4)],
                         capture_output=True, text=True, timeout=TIMEOUT, env=AGENT_ENV)
    assert one.returncode == 0, one.stderr[-3000:]
    _same_adapter(_adapter(out), _adapter(tmp_path / "one"))  # a local-rank split would differ: both local 0
    assert (out / "predictions.json").read_text() == (tmp_path / "one" / "predictions.json").read_text()
    assert json.loads((out / "metrics.json").read_text())["processes"] == 2
    # each process says where it stands; exactly one, global rank 0, writes (both are local rank 0)
    said = sorted(line.split("] ", 1)[1] for err in logs for line in err.splitlines() if " of 2 (local rank " in line)
    assert [s.split(" (")[0] for s in said] == ["process 0 of 2", "process 1 of 2"], said
    assert all("(local rank 0 on " in s for s in said)
    assert said[0].endswith("writes the run folder and the log") and "writes the run folder" not in said[1]
    assert sum("exact match" in err for err in logs) == 1  # the scores are logged by the writer alone


def _worker(agent: subprocess.Popen) -> int:
    """The process torchrun started for ``agent``."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("torchrun started no worker")


def _kill_a_worker_mid_training(agents: list[subprocess.Popen], out: Path, seed: int) -> int:
    """kill -9 the second agent's worker once checkpoint ``step`` (random, mid-run) exists; returns the step."""
    step = random.Random(seed).randint(2, 9)  # 3 steps an epoch, 12 in all: any of them, mid-epoch or not
    deadline = time.monotonic() + TIMEOUT
    while not any(int(p.name[5:]) >= step for p in (out / "checkpoints").glob("step-*")):
        assert time.monotonic() < deadline and all(a.poll() is None for a in agents), "the run ended too soon"
        time.sleep(0.01)
    os.kill(_worker(agents[1]), signal.SIGKILL)
    return step


def test_a_lost_machine_restarts_and_resumes_by_itself(two_machines, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    agents = _agents(_flags(tiny_model_dir, out, epochs=4), tmp_path / "logs", max_restarts=2)
    step = _kill_a_worker_mid_training(agents, out, seed=1)
    results = _finish(agents)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    logs = "".join(err for _, err in results)
    assert "after 1 restart(s) by torchrun" in logs and "resuming from" in logs, (step, logs[-3000:])
    _same_adapter(_adapter(out), _adapter(two_machines[0]))
    assert (out / "predictions.json").read_text() == (two_machines[0] / "predictions.json").read_text()


def test_without_restarts_the_same_command_again_on_both_machines_resumes(two_machines, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    flags = _flags(tiny_model_dir, out, epochs=4)
    agents = _agents(flags, tmp_path / "logs")
    _kill_a_worker_mid_training(agents, out, seed=2)
    assert any(code != 0 for code, _ in _finish(agents))  # the job fails, its checkpoints stay
    assert not (out / "metrics.json").exists()
    results = _finish(_agents(flags, tmp_path / "logs-again"))
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert "resuming from" in "".join(err for _, err in results)
    _same_adapter(_adapter(out), _adapter(two_machines[0]))


def test_process_0_failing_a_save_ends_every_process_with_the_reason(tiny_model_dir, tmp_path):
    """Process 0 cannot write its checkpoint (a full disk, here): process 1, on another machine, learns
    it at the save's next collective and stops too, saying why, instead of waiting at a barrier for the
    collective's timeout (30 minutes); neither agent has to be killed."""
    script = tmp_path / "full_disk_on_0.py"
    script.write_text("import os, sys\n"
                      "from loraqa.training import checkpoint\n"
                      "if os.environ.get('RANK') == '0':\n"
                      "    def full(*args, **kwargs):\n"
                      "        raise OSError(28, 'No space left on device')\n"
                      "    checkpoint.save_file = full\n"
                      "from loraqa.cli import main\n"
                      "sys.exit(main(sys.argv[1:]))\n")
    flags = _flags(tiny_model_dir, tmp_path / "run")
    results = _finish(_agents([str(script), *flags[2:]], tmp_path / "logs"))
    codes, logs = [code for code, _ in results], "".join(log for _, log in results)
    assert all(code not in (0, -signal.SIGKILL) for code in codes), (codes, logs[-3000:])  # each ended by itself
    assert "No space left on device" in logs
    assert "checkpoint: process 0 failed writing" in logs and "every process stops" in logs
