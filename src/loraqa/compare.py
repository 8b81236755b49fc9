"""The ablation: no fine-tuning vs LoRA vs full fine-tuning vs a span head (plus extra LoRA rows), same data and seed.

Each row is an ordinary run folder under the output dir, made by ``loraqa train`` / ``loraqa
evaluate`` in a subprocess of its own, so its peak memory is its own. A row whose folder already
holds a finished run with the same settings is reused, not retrained.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from loraqa.config import Config, load_config
from loraqa.io import write_text_atomic
from loraqa.scoring.report import write_report

METHODS = ("zero-shot", "lora", "full", "span")


def parse_extra(spec: str) -> tuple[str, dict]:
    """'NAME:key=value;key=value' -> (NAME, settings); lists are comma-separated."""
    name, _, body = spec.partition(":")
    if not name or not body:
        raise ValueError(f"--extra {spec!r}: expected NAME:key=value[;key=value]")
    settings = {}
    for item in body.split(";"):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--extra {spec!r}: {item!r} is not key=value")
        settings[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return name, {"method": "lora", **settings}


def plan_rows(base: Config, methods: list[str], extras: list[str]) -> dict[str, tuple[str, Config]]:
    """{row name: (command, settings)} in report order."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    out = Path(base.output_dir)
    rows = {}
    for method in methods:
        command = "evaluate" if method == "zero-shot" else "train"
        overrides = {"output_dir": str(out / method)}
        if method != "zero-shot":
            overrides["method"] = method
        rows[method] = (command, base.replace(**overrides))
    for spec in extras:
        name, settings = parse_extra(spec)
        rows[name] = ("train", base.replace(**settings, output_dir=str(out / name)))
    return rows


def same_run(folder: Path, config: Config) -> bool:
    """A finished run whose saved settings equal ``config`` (settings added since take their defaults)."""
    if not (folder / "metrics.json").is_file() or not (folder / "config.yaml").is_file():
        return False
    return load_config(None, yaml.safe_load((folder / "config.yaml").read_text())) == config


def run_in_subprocess(command: str, config: Config, request: Path, quiet: bool) -> bool:
    """``loraqa COMMAND`` with ``config`` (saved to ``request``) in a process of its own; True on success."""
    write_text_atomic(request, yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))
    cmd = [sys.executable, "-m", "loraqa.cli", command, "--config", str(request)] + (["--quiet"] if quiet else [])
    return subprocess.run(cmd).returncode == 0


def run_compare(base: Config, methods: list[str], extras: list[str], quiet: bool = False) -> Path:
    rows = plan_rows(base, methods, extras)
    requests = Path(base.output_dir) / ".requests"
    for name, (command, config) in rows.items():
        folder = Path(config.output_dir)
        if same_run(folder, config):
            print(f"[loraqa] compare: {name}: reusing {folder}", file=sys.stderr, flush=True)
            continue
        if (folder / "metrics.json").exists():
            raise ValueError(f"{folder} holds a run with other settings; remove it or choose another --output-dir")
        print(f"[loraqa] compare: {name}: loraqa {command} -> {folder}", file=sys.stderr, flush=True)
        if not run_in_subprocess(command, config, requests / f"{name}.yaml", quiet):
            raise ValueError(f"compare row {name} failed (see its output above); finished rows are kept")
    return write_report([rows[name][1].output_dir for name in rows], base.output_dir)

