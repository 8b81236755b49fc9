"""What spans every stage's talk with the outside: files written atomically (a reader, or a crash,
never sees half a file), JSON Lines, the log line, and whether the Hugging Face hub answers."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to disk (a rename alone can outlive a power cut, its data not)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a file created or renamed in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_file_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` fills a temporary file in the same folder; it is fsynced, then renamed over
    ``path`` and the folder fsynced, so ``path`` is never half-written, even after a power cut (and
    the temporary file never left behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes files private; run files are for sharing
        write(Path(tmp))
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
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
    """``write(tmp_dir)``, its files and itself flushed to disk, then swapped into place, so
    ``target`` is never half-written, even after a power cut. The folder it replaces is renamed
    aside (``.<name>.old``) and deleted only once the new one is in; one a kill left there does not
    fail the next save (a folder cannot be renamed onto a full one)."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    for path in tmp.rglob("*"):
        if path.is_file():
            fsync_file(path)
    fsync_dir(tmp)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        if old.exists():  # left by a kill after an earlier swap: target is newer
            shutil.rmtree(old)
        target.rename(old)
    # else an ``old`` there is the previous save's only copy (a kill came between the renames): kept till the new is in
    tmp.rename(target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def log(message: str) -> None:
    """One line on standard error, marked as loraqa's."""
    print(f"[loraqa] {message}", file=sys.stderr, flush=True)


# seconds between tries when the hub answers 429 or 5xx (its own trouble, often brief)
HUB_RETRY_SECONDS = (1.0, 2.0, 4.0)


@dataclass(frozen=True)
class HubAnswer:
    """What the hub said about a repository: ``state`` "cached" (in the local hub cache), "ok",
    "unreachable" (no answer: offline, DNS, a firewall), "refused" (401/403/404: private, gated,
    or no such repository) or "failing" (429/5xx, after retries); ``detail`` one line of why."""

    state: str
    detail: str = ""
    token: bool = False  # whether a token was sent

    @property
    def usable(self) -> bool:
        return self.state in ("cached", "ok")


def hub_status(name: str, kind: str = "models", timeout: float = 5.0) -> HubAnswer:
    """Whether the hub can serve ``name`` now (a model, or ``kind="datasets"``): in the local hub
    cache, or one short request with the user's token (``HF_TOKEN`` or ``hf auth login``'s), so an
    offline machine learns it in seconds (transformers' own attempts retry for ~50 s). A 429 or
    5xx is tried again after each of ``HUB_RETRY_SECONDS``."""
    from huggingface_hub import constants, get_token, try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json" if kind == "models" else "README.md",
                                    repo_type=kind.rstrip("s"))
    if isinstance(cached, str):
        return HubAnswer("cached")
    if constants.HF_HUB_OFFLINE:
        return HubAnswer("unreachable", "HF_HUB_OFFLINE is set")
    token = get_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for wait in (*HUB_RETRY_SECONDS, None):
        request = urllib.request.Request(f"{constants.ENDPOINT}/api/{kind}/{name}", method="HEAD", headers=headers)
        try:
            urllib.request.urlopen(request, timeout=timeout)
            return HubAnswer("ok", token=bool(token))
        except urllib.error.HTTPError as e:
            if e.code in (401, 403, 404):
                return HubAnswer("refused", f"HTTP {e.code}", bool(token))
            if e.code != 429 and e.code < 500:
                return HubAnswer("refused", f"HTTP {e.code}", bool(token))
            answer = HubAnswer("failing", f"HTTP {e.code}, {len(HUB_RETRY_SECONDS) + 1} tries", bool(token))
        except (urllib.error.URLError, OSError, ValueError) as e:
            return HubAnswer("unreachable", str(getattr(e, "reason", e)), bool(token))
        if wait is not None:
            time.sleep(wait)
    return answer


def hub_refusal(name: str, answer: HubAnswer, what: str = "--model") -> str:
    """One line for a hub that refused ``name`` or keeps failing (``answer.state`` refused / failing)."""
    if answer.state == "failing":
        return (f"{what} {name}: the Hugging Face hub is failing ({answer.detail}); try again later, or give a "
                "local folder")
    if answer.token:
        return (f"{what} {name}: the Hugging Face hub refused it ({answer.detail}) with your token (HF_TOKEN or "
                "`hf auth login`): check the name, and that the token may read it (gated models need access "
                "granted on the hub)")
    return (f"{what} {name}: the Hugging Face hub refused it ({answer.detail}) and no token was sent: check the "
            "name; a private or gated model needs one (set HF_TOKEN or run `hf auth login`)")


def hub_reachable(name: str, kind: str = "models", timeout: float = 5.0) -> bool:
    """Whether the hub can serve ``name`` now (see :func:`hub_status`)."""
    return hub_status(name, kind, timeout).usable
