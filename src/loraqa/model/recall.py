"""What a check decided about a model, kept in loraqa's cache folder (``checks/``) so the next process
need not run it again: keyed by everything that decides it (:func:`check_key`), so any change of
them (other weights, config, adapter, library versions, dtype, device) runs the check again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from loraqa.io import log, write_json_atomic
from loraqa.model.fetch import cache_dir

CHECKS = "checks"


def check_key(model, config, adapter: str | None, kind: str) -> str | None:
    """The key of check ``kind`` on ``model`` (loaded from ``config``, with ``adapter``); None where
    its weights have no files to hash (``--init random``: checked every time)."""
    import torch
    import transformers

    import loraqa
    from loraqa.model.weights import file_sha256, weights_record

    weights = weights_record(config)["files"]
    if not weights:
        return None
    parameter = next(model.parameters())
    files = sorted(Path(adapter).glob("adapter_*")) if adapter else []
    what = {"kind": kind, "weights": weights, "config": model.config.to_json_string(use_diff=False),
            "adapter": {f.name: file_sha256(f) for f in files}, "loraqa": loraqa.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__, "dtype": str(parameter.dtype),
            "device": parameter.device.type}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def _file(key: str) -> Path:
    return cache_dir() / CHECKS / f"{key}.json"


def recalled(key: str | None) -> dict | None:
    """What was recorded under ``key`` (None: nothing, or no key)."""
    if key is None:
        return None
    try:
        found = json.loads(_file(key).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def remember(key: str | None, verdict: dict, what: str) -> None:
    """Record ``verdict`` under ``key``; where the cache cannot be written, say so in one line."""
    if key is None:
        return
    try:
        write_json_atomic(_file(key), verdict)
    except OSError as e:
        log(f"cannot record {what} in {_file(key).parent} ({e.strerror or e}); it runs again next time")
