"""Make a SQuAD v2.0-style file with unanswerable questions from a SQuAD v1.1 file.

A chosen question moves to another passage of the same article that contains none of its gold
answers (compared after the official normalisation) and becomes unanswerable there
(``is_impossible: true``, no answers); the rest stay as they were. About ``--fraction`` of the
questions are chosen (seeded); one whose article has no such passage stays answerable (counted).
Each question appears once, in its passage's order, so a file's first N questions hold about
``fraction`` x N unanswerable ones.

These questions are easier than SQuAD v2.0's: those were written by crowdworkers to look answerable
from their own passage, with plausible answers in it; these were asked about another passage of the
same article, so the topic matches but the words often do not.

    python scripts/make_unanswerable.py ../shared/data/squad/proxy-dev-v1.1.json runs/v2/dev.json \
        [--fraction 0.33] [--seed 0] [--answerable-out runs/v2/dev-answerable.json]

``--answerable-out`` also writes the same file without its unanswerable questions (v1.1), for the
comparison with a model trained on answerable questions alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from loraqa.data.examples import read_text  # noqa: E402
from loraqa.io import write_json_atomic  # noqa: E402
from loraqa.scoring.squad_v1 import normalize_answer  # noqa: E402


def mentions(context: str, answer: str) -> bool:
    """Whether ``answer`` occurs in ``context`` as whole words, after the official normalisation."""
    return f" {normalize_answer(answer)} " in f" {normalize_answer(context)} "


def make_unanswerable(squad: dict, fraction: float, seed: int) -> tuple[dict, dict[str, int]]:
    """(the v2.0 object, counts): about ``fraction`` of the questions moved to a passage without their answers."""
    rng = random.Random(seed)
    out = {"version": "v2.0", "data": []}
    counts = {"questions": 0, "unanswerable": 0, "kept_no_other_passage": 0}
    for article in squad["data"]:
        paragraphs = [{"context": p["context"], "qas": []} for p in article["paragraphs"]]
        for p, paragraph in enumerate(article["paragraphs"]):
            for qa in paragraph["qas"]:
                counts["questions"] += 1
                if rng.random() >= fraction:
                    paragraphs[p]["qas"].append(copy.deepcopy(qa))
                    continue
                golds = [a["text"] for a in qa["answers"]]
                others = [i for i, other in enumerate(article["paragraphs"])
                          if i != p and not any(mentions(other["context"], g) for g in golds)]
                if not others:
                    counts["kept_no_other_passage"] += 1
                    paragraphs[p]["qas"].append(copy.deepcopy(qa))
                    continue
                target = rng.choice(others)
                paragraphs[target]["qas"].append({"id": qa["id"], "question": qa["question"], "answers": [],
                                                  "is_impossible": True})
                counts["unanswerable"] += 1
        out["data"].append({"title": article["title"], "paragraphs": paragraphs})
    return out, counts


def answerable_only(v2: dict) -> dict:
    """The same questions, in the same order, without the unanswerable ones (a v1.1 object)."""
    data = [{"title": a["title"], "paragraphs": [{"context": p["context"],
                                                  "qas": [qa for qa in p["qas"] if qa["answers"]]}
                                                 for p in a["paragraphs"]]} for a in v2["data"]]
    return {"version": "1.1", "data": data}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a SQuAD v1.1 JSON file")
    parser.add_argument("output", help="the v2.0 JSON file to write")
    parser.add_argument("--fraction", type=float, default=1 / 3, help="share of questions to make unanswerable")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--answerable-out", help="also write the answerable questions alone here (v1.1)")
    args = parser.parse_args()
    if not 0 <= args.fraction <= 1:
        parser.error("--fraction must be between 0 and 1")
    v2, counts = make_unanswerable(json.loads(read_text(Path(args.source))), args.fraction, args.seed)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(args.output), v2)
    if args.answerable_out:
        write_json_atomic(Path(args.answerable_out), answerable_only(v2))
    print(f"{args.output}: {counts['questions']} questions, {counts['unanswerable']} made unanswerable, "
          f"{counts['kept_no_other_passage']} kept answerable (no passage of their article lacked their answers)")


if __name__ == "__main__":
    main()
