"""Training checkpoints: everything needed to continue a run as if it had never stopped.

A checkpoint is a folder ``checkpoints/step-00000123/`` holding
    trainable.safetensors   the trainable weights (LoRA adapters, or every weight for 'full')
    optimizer.pt, scheduler.pt, scaler.pt, rng-<rank>.pt (one per process)
    state.json              epoch, batch position in the epoch, step, partial sums, history
It is written under a temporary name and renamed when complete, and renamed away before it is
deleted, so a crash never leaves a half-written or half-deleted checkpoint that looks finished;
only the newest ``keep`` are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loraqa.training.processes import Processes

_NAME = re.compile(r"^step-(\d{8})$")


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, scaler, state: dict, keep: int = 2,
                    processes: Processes | None = None) -> Path:
    """The main process writes the shared files, every process its RNG state; then one rename."""
    processes = processes or Processes.single()
    final = folder / f"step-{step:08d}"
    tmp = folder / f".step-{step:08d}.tmp"
    if processes.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({n: t.cpu() for n, t in trainable_state(model).items()}, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    processes.barrier()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / f"rng-{processes.rank}.pt")
    processes.barrier()
    if processes.is_main:
        if final.exists():  # the same step saved again (an epoch's end, Ctrl-C right after a save)
            _discard(final)
        tmp.rename(final)
        for old in list_checkpoints(folder)[:-keep]:
            _discard(old)
    processes.barrier()
    return final


def _discard(checkpoint: Path) -> None:
    """Rename out of :func:`list_checkpoints`' sight, then delete: a kill half-way through the
    deletion never leaves a half-deleted checkpoint under a name that a resume would load."""
    trash = checkpoint.with_name(f".{checkpoint.name}.old")
    shutil.rmtree(trash, ignore_errors=True)
    checkpoint.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name))


def resumed_precision(folder: Path) -> str | None:
    """The precision the newest checkpoint in ``folder`` was trained in (None: nothing to resume).
    A resumed run keeps it: ``--precision auto`` may choose differently on a second probe."""
    saved = list_checkpoints(folder)
    return json.loads((saved[-1] / "state.json").read_text()).get("precision") if saved else None


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler, rank: int = 0) -> dict:
    """Restore weights, optimizer, scheduler, scaler and RNG from ``path``; returns its state."""
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = set(trainable_state(model)) - set(weights)
    if missing:
        raise ValueError(f"checkpoint {path} does not match this model: no {sorted(missing)[0]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
    rng_path = path / f"rng-{rank}.pt"
    if not rng_path.is_file():
        raise ValueError(f"checkpoint {path} was made by fewer processes (no {rng_path.name}); resume with as many")
    rng = torch.load(rng_path, weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "state.json").read_text())
