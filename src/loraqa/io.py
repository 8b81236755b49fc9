"""What spans every stage's talk with the outside: files written atomically (a reader, or a crash,
never sees half a file), JSON Lines, the log line, and whether the Hugging Face hub answers."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable


def save_file_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` fills a temporary file in the same folder; it is fsynced, then renamed over
    ``path``, so ``path`` is never half-written (and the temporary file never left behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes files private; run files are for sharing
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    save_file_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl_atomic(path: str | Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def save_dir_atomic(target: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp_dir)`` then swap the folder into place, so ``target`` is never half-written."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def log(message: str) -> None:
    """One line on standard error, marked as loraqa's."""
    print(f"[loraqa] {message}", file=sys.stderr, flush=True)


def hub_reachable(name: str, kind: str = "models", timeout: float = 5.0) -> bool:
    """Whether the hub can serve ``name`` now (a model, or ``kind="datasets"``): in the local hub
    cache, or the hub answers one short request, so an offline machine learns it in seconds
    (transformers' own attempts retry for ~50 s)."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json" if kind == "models" else "README.md",
                                    repo_type=kind.rstrip("s"))
    if isinstance(cached, str):
        return True
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        request = urllib.request.Request(f"{constants.ENDPOINT}/api/{kind}/{name}", method="HEAD")
        urllib.request.urlopen(request, timeout=timeout)
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False
