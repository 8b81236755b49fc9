"""Write the SQuAD sample that ships inside the package (``src/loraqa/samples/``).

Whole passages, in file order, from the article-level split of the official SQuAD v1.1 dev set in
``../shared/data/squad``: the first passages of ``proxy-train`` up to ~1,000 questions for training,
and of ``proxy-dev`` up to ~300 for evaluation (the budgets the README's quality numbers use).
Deterministic: gzip without a timestamp, keys in file order, so a rerun rewrites the same bytes.

    python scripts/make_squad_sample.py [--shared ../shared/data/squad]
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "loraqa" / "samples"
SPLITS = {"train": ("proxy-train-v1.1.json", 1000), "eval": ("proxy-dev-v1.1.json", 300)}


def first_passages(data: dict, questions: int) -> dict:
    """The leading passages whose questions add up to the first count >= ``questions``."""
    articles, total = [], 0
    for article in data["data"]:
        kept = []
        for paragraph in article["paragraphs"]:
            if total >= questions:
                break
            kept.append(paragraph)
            total += len(paragraph["qas"])
        if kept:
            articles.append({"title": article["title"], "paragraphs": kept})
    return {"version": data["version"], "data": articles}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "squad"))
    args = parser.parse_args()
    for split, (name, questions) in SPLITS.items():
        sample = first_passages(json.loads((Path(args.shared) / name).read_text(encoding="utf-8")), questions)
        text = json.dumps(sample, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        target = OUT / f"squad-{split}.json.gz"
        with open(target, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
            gz.write(text)
        n = sum(len(p["qas"]) for a in sample["data"] for p in a["paragraphs"])
        print(f"{target}: {n} questions, {sum(len(a['paragraphs']) for a in sample['data'])} passages, "
              f"{target.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
