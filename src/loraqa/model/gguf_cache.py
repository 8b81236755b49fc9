"""A GGUF file read once: its de-quantised weights, config and tokenizer kept as a model folder.

transformers turns a GGUF file into float weights on every load, and parses it once for the
config, once for the tokenizer and twice for the weights (gguf's reader rebuilds the vocabulary's
fields each time: about 20 s for SmolLM2's 100 MB file on a 2-core CPU, for a model that then
answers in a fraction of a second). So the first load parses it once (one ``GGUFReader`` for the
whole build) and saves what it read into loraqa's cache folder (``$LORAQA_CACHE``, default
``~/.cache/loraqa``) as an ordinary model folder (``model.safetensors``, config, tokenizer) named
by the file's sha256; every later load is transformers' load of that folder (safetensors, mmap).
The weights are the same tensors, so answers do not move.

An entry is checked each time it is used (every file its manifest lists, at the size it lists; the
safetensors header readable) and rebuilt when it fails; a build is written beside the entry and
renamed in whole. Where the cache cannot be written (a full or read-only disk) the GGUF file is read
as before, said in one line. ``loraqa cache`` says its size; ``loraqa cache clear`` frees it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from loraqa.io import fsync_dir, fsync_file, log, write_json_atomic
from loraqa.model.fetch import cache_dir
from loraqa.model.weights import file_sha256

MODELS = "models"                  # the cache's sub-folder of GGUF files' model folders
MANIFEST = "loraqa-cache.json"     # in an entry: where it came from and each file's size
WEIGHTS = "model.safetensors"


def gguf_folder(path: Path) -> Path | None:
    """The model folder of the GGUF file ``path`` in the cache, built on first use (or when its entry
    is damaged); None where the cache cannot be written (the caller reads the file itself)."""
    digest = file_sha256(path)
    entry = cache_dir() / MODELS / digest
    problem = entry_problem(entry)
    if problem is None:
        return entry
    if entry.exists():
        log(f"cache: {entry} {problem}; rebuilding it from {path}")
    else:
        log(f"cache: reading {path.name} once into {entry} (later loads read that folder)")
    try:
        model, tokenizer = read_gguf(path)
    except Exception as e:  # noqa: BLE001 - gguf and transformers raise many kinds on a file they cannot read
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--model {path}: cannot read it as a GGUF model ({detail})") from None
    try:
        _save(model, tokenizer, path, entry, digest)
    except OSError as e:
        log(f"cache: cannot write {entry} ({e.strerror or e}); {path.name} is read from the GGUF file each time")
        return None
    size, _ = cache_size(cache_dir())
    log(f"cache: {entry.name[:12]}... holds {cache_size(entry)[0] / 2**20:,.0f} MiB; loraqa's cache "
        f"{size / 2**20:,.0f} MiB in all (`loraqa cache clear` frees it)")
    return entry


def entry_problem(entry: Path) -> str | None:
    """None for a sound entry, else what is wrong with it (missing, a file absent or of another size,
    unreadable weights)."""
    import json

    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, KeyError, TypeError):
        return f"has an unreadable {MANIFEST}"
    for name, size in files.items():
        file = entry / name
        if not file.is_file() or file.stat().st_size != size:
            return f"has {name} {'missing' if not file.is_file() else 'at another size'}"
    try:
        from safetensors import safe_open

        with safe_open(str(entry / WEIGHTS), framework="pt") as weights:
            weights.keys()
    except Exception as e:  # noqa: BLE001 - any failure to read the header means rebuild
        return f"has unreadable weights ({type(e).__name__})"
    return None


@contextlib.contextmanager
def one_parse():
    """Every ``gguf.GGUFReader(path)`` transformers makes inside, the same reader per path: one parse
    of a file however many times transformers opens it."""
    import gguf

    made = gguf.GGUFReader
    readers: dict[str, object] = {}

    def reader(path, *args, **kwargs):
        key = os.fspath(path)
        if key not in readers:
            readers[key] = made(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = made


def read_gguf(path: Path):
    """(model, tokenizer) from the GGUF file itself, parsed once: float32, de-quantised, unmarked."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with one_parse():
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    unmark_quantized(model)
    return model, tokenizer


def unmark_quantized(model) -> None:
    """GGUF weights arrive de-quantised; drop the flags that make trainers refuse them."""
    if getattr(model, "hf_quantizer", None) is None:
        return
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _save(model, tokenizer, path: Path, entry: Path, digest: str) -> None:
    import transformers

    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        write_json_atomic(tmp / MANIFEST, {"gguf": str(path), "sha256": digest, "transformers": transformers.__version__,
                                           "files": files})
        for f in tmp.iterdir():
            fsync_file(f)
        fsync_dir(tmp)
        shutil.rmtree(entry, ignore_errors=True)  # a damaged entry
        os.replace(tmp, entry)
        fsync_dir(entry.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_size(root: Path | None = None) -> tuple[int, int]:
    """(bytes, files) under the cache folder."""
    root = root or cache_dir()
    files = [f for f in root.rglob("*") if f.is_file()] if root.is_dir() else []
    return sum(f.stat().st_size for f in files), len(files)


def clear_cache(root: Path | None = None) -> int:
    """Delete what loraqa keeps in its cache folder (models read from GGUF files, checks, hashes) but
    the downloaded GGUF files themselves; the bytes freed."""
    root = root or cache_dir()
    freed = 0
    for part in (MODELS, "checks", "sha256.json"):
        target = root / part
        if target.is_dir():
            freed += cache_size(target)[0]
            shutil.rmtree(target)
        elif target.is_file():
            freed += target.stat().st_size
            target.unlink()
    return freed
