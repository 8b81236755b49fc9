"""What the recipes share: the text files of a folder, and the model a loraqa server answers with."""

from __future__ import annotations

import argparse
import json
import urllib.request
from pathlib import Path

SUFFIXES = (".txt", ".md")


def read_folder(folder: str) -> list[tuple[str, str]]:
    """(file name, text) of each .txt and .md file under ``folder``, sorted by path."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    if not files:
        raise SystemExit(f"{folder}: no .txt or .md files")
    return [(str(p.relative_to(folder)), p.read_text(encoding="utf-8")) for p in files]


def served_model(base: str) -> str:
    """The first model ``GET /v1/models`` lists (the base, or its merged adapter)."""
    with urllib.request.urlopen(f"{base}/models", timeout=10) as reply:
        return json.load(reply)["data"][0]["id"]


def recipe_args(doc: str) -> argparse.Namespace:
    """A recipe's command line: the folder, the question, the server, how many chunks to retrieve."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, help="the .txt and .md files to answer from")
    parser.add_argument("--question", required=True)
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="loraqa serve's OpenAI API")
    parser.add_argument("--k", type=int, default=3, help="chunks retrieved")
    return parser.parse_args()
