"""Training checkpoints: everything needed to continue a run as if it had never stopped.

A checkpoint is a folder ``checkpoints/step-00000123/`` holding
    trainable.safetensors   the trainable weights (LoRA adapters, or every weight for 'full')
    optimizer.pt, scheduler.pt, scaler.pt, rng-<rank>.pt (one per process)
    state.json              epoch, batch position in the epoch, step, partial sums, history
    manifest.json           every other file's size and sha256
It is written as the run's other files are (``io.save_file_atomic``): under a temporary name, each
file and then the folder flushed to disk (fsync), then renamed, so after a crash or a power cut a
folder under a checkpoint's name holds what its manifest says. A resume checks the newest against
its manifest and, where a file is missing, short or changed, moves it aside (``.step-N.damaged``,
kept for a look) and takes the one before, saying so. It is renamed away before it is deleted, so a
kill never leaves a half-deleted checkpoint; only the newest ``keep`` are kept. A step saved again
(an epoch's end) moves its first save aside (``.step-N.replaced``) and deletes it only once the new
one is in: a kill between leaves that aside as the step's checkpoint, even with ``keep`` 1.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loraqa.io import fsync_dir, fsync_file, write_json_atomic
from loraqa.training.processes import Processes

_NAME = re.compile(r"^step-(\d{8})$")
_REPLACED = re.compile(r"^\.step-(\d{8})\.replaced$")  # a step's first save, aside while it is saved again
MANIFEST = "manifest.json"
FEWER = "saved by fewer processes"  # than resume it: every older checkpoint too, so a stop, not a fallback


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, step: int, model, optimizer, scheduler, scaler, state: dict, keep: int = 2,
                    processes: Processes | None = None) -> Path:
    """The main process writes the shared files, every process its RNG state; the main process
    then writes the manifest, flushes the folder and renames it. Whatever fails on one process
    fails the save on every one, at the next step of it (no process waits at a barrier for one
    that gave up)."""
    processes = processes or Processes.single()
    final = folder / f"step-{step:08d}"
    tmp = folder / f".step-{step:08d}.tmp"

    def shared_files() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({n: t.cpu() for n, t in trainable_state(model).items()}, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))

    def rng_file() -> None:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / f"rng-{processes.rank}.pt")
        fsync_file(tmp / f"rng-{processes.rank}.pt")

    def into_place() -> None:
        write_manifest(tmp)
        fsync_dir(tmp)
        replaced = _replaced(folder, step)
        if final.exists():  # the same step saved again (an epoch's end, Ctrl-C right after a save)
            if replaced.exists():  # left by a kill after an earlier swap: final is newer
                shutil.rmtree(replaced)
            final.rename(replaced)
        # else a ``replaced`` there is the step's checkpoint (a kill came before its new save was in): kept till then
        tmp.rename(final)
        fsync_dir(folder)
        shutil.rmtree(replaced, ignore_errors=True)
        for old in list_checkpoints(folder)[:-keep]:
            _discard(old)

    together(processes, shared_files if processes.is_main else None, f"writing {tmp}")
    together(processes, rng_file, f"writing {tmp}")
    together(processes, into_place if processes.is_main else None, f"moving {tmp} into place")
    return final


def together(processes: Processes, work, what: str) -> None:
    """``work()`` (None: nothing here), then every process learns whether it failed anywhere: one
    collective instead of a barrier, so a failure ends the job on every process at once (a save,
    a resume)."""
    failed = None
    try:
        if work is not None:
            work()
    except Exception as e:  # noqa: BLE001 - said on every process below
        failed = e
    if processes.world > 1:
        flags = torch.zeros(processes.world, dtype=torch.float64, device=processes.device)
        flags[processes.rank] = failed is not None
        flags = processes.sum(flags)
        if failed is None and flags.any():
            raise ValueError(f"checkpoint: process {int(flags.nonzero()[0])} failed {what}; every process stops")
    if isinstance(failed, OSError):  # a full disk, a folder gone: one line, as other bad settings are
        raise ValueError(f"checkpoint: {what} failed: {failed}") from failed
    if failed is not None:
        raise failed


def write_manifest(checkpoint: Path) -> None:
    """Each file's size and sha256, after flushing it to disk; written last, and flushed too."""
    files = {}
    for path in sorted(p for p in checkpoint.iterdir() if p.is_file() and p.name != MANIFEST):
        fsync_file(path)
        files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    write_json_atomic(checkpoint / MANIFEST, {"files": files})


def damage(checkpoint: Path) -> str | None:
    """What is wrong with ``checkpoint`` against its manifest (None: nothing)."""
    try:
        files = json.loads((checkpoint / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"no readable {MANIFEST} ({type(e).__name__})"
    for name, want in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} holds {path.stat().st_size:,} bytes, {want['bytes']:,} were written"
        if _sha256(path) != want["sha256"]:
            return f"{name} is not the file that was written (sha256 differs)"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def set_aside(checkpoint: Path) -> Path:
    """Move a damaged checkpoint out of :func:`list_checkpoints`' sight, kept for a look."""
    aside = checkpoint.with_name(f".step-{checkpoint_step(checkpoint):08d}.damaged")
    shutil.rmtree(aside, ignore_errors=True)
    checkpoint.rename(aside)
    return aside


def _discard(checkpoint: Path) -> None:
    """Rename out of :func:`list_checkpoints`' sight, then delete: a kill half-way through the
    deletion never leaves a half-deleted checkpoint under a name that a resume would load."""
    step = checkpoint_step(checkpoint)
    if checkpoint != _replaced(checkpoint.parent, step):  # a stale aside of it would come into sight
        shutil.rmtree(_replaced(checkpoint.parent, step), ignore_errors=True)
    trash = checkpoint.with_name(f".step-{step:08d}.old")
    shutil.rmtree(trash, ignore_errors=True)
    checkpoint.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored): a
    step's ``step-N``, or its ``.step-N.replaced`` where a kill came before its new save was in."""
    if not folder.is_dir():
        return []
    found: dict[int, Path] = {}
    for pattern in (_NAME, _REPLACED):  # step-N first: beside it, an aside is stale
        for path in folder.iterdir():
            if path.is_dir() and (match := pattern.match(path.name)):
                found.setdefault(int(match[1]), path)
    return [found[step] for step in sorted(found)]


def checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint in :func:`list_checkpoints` was saved at."""
    return int((_NAME.match(checkpoint.name) or _REPLACED.match(checkpoint.name))[1])


def _replaced(folder: Path, step: int) -> Path:
    return folder / f".step-{step:08d}.replaced"


def problem_here(checkpoint: Path, rank: int) -> str | None:
    """What keeps this process from loading ``checkpoint`` (None: nothing): damage against its
    manifest, or no RNG state of its own."""
    problem = damage(checkpoint)
    if problem is None and not (checkpoint / f"rng-{rank}.pt").is_file():
        problem = f"{FEWER} (no rng-{rank}.pt)"
    return problem


def agree_on_checkpoint(views: list[dict[int, str | None]]) -> tuple[int | None, dict[int, str]]:
    """(the step to resume, None: none; {newer step: why not}) from every process's view, in rank
    order ({step: :func:`problem_here`}): the newest checkpoint that every process can load. Each
    process decides from the same views, so all take the same one, or all stop with the same
    ``ValueError`` where the run had fewer processes (the process count must not change)."""
    passed: dict[int, str] = {}
    for step in sorted(set().union(*views), reverse=True):
        problems = [(rank, view.get(step, "not found")) for rank, view in enumerate(views)]
        problems = [(rank, problem) for rank, problem in problems if problem is not None]
        if not problems:
            return step, passed
        rank, problem = problems[0]
        if problem.startswith(FEWER):
            raise ValueError(f"checkpoint step-{step:08d} was {problem}; resume with as many")
        passed[step] = problem if len(views) == 1 else f"process {rank}: {problem}"
    return None, passed


def resumed_precision(folder: Path) -> str | None:
    """The precision the newest sound checkpoint in ``folder`` was trained in (None: nothing to
    resume). A resumed run keeps it: ``--precision auto`` may choose differently on a second probe."""
    for checkpoint in reversed(list_checkpoints(folder)):
        if damage(checkpoint) is None:
            return json.loads((checkpoint / "state.json").read_text()).get("precision")
    return None


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler, rank: int = 0) -> dict:
    """Restore weights, optimizer, scheduler, scaler and RNG from ``path``; returns its state. A
    file that cannot be read is a ``ValueError`` naming it (:func:`problem_here` checks them first)."""
    try:
        weights = load_file(path / "trainable.safetensors")
    except Exception as e:  # noqa: BLE001 - safetensors' own errors are not ValueErrors
        raise ValueError(f"checkpoint {path}: trainable.safetensors cannot be read ({type(e).__name__}: {e})") from None
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
        raise ValueError(f"checkpoint {path} was {FEWER} (no {rng_path.name}); resume with as many")
    rng = torch.load(rng_path, weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "state.json").read_text())
