"""Scores of a set of predictions: the official v1.1 rules, or v2.0's where there are unanswerable
questions; and ``loraqa score``, a drop-in for the official scripts on a predictions file."""

from __future__ import annotations

import json
from pathlib import Path

from loraqa.data.examples import DataError, Example
from loraqa.data.load import load_file
from loraqa.data.squad import is_v2, squad_version
from loraqa.scoring.squad_v1 import squad_scores
from loraqa.scoring.squad_v2 import squad_v2_scores


def score(examples: list[Example], predictions: dict[str, str], na_probs: dict[str, float] | None = None) -> dict:
    """The official v1.1 scores; with unanswerable questions, the v2.0 ones (``exact_match`` and ``f1``
    are then v2.0's ``exact`` and ``f1``, and ``squad_v2`` holds the whole v2.0 dict, with
    ``best_*`` and their thresholds when ``na_probs`` are given)."""
    golds = {ex.id: ex.answers for ex in examples}
    if all(ex.answerable for ex in examples):
        return squad_scores(golds, predictions)
    v2 = squad_v2_scores(golds, predictions, na_probs)
    return {"exact_match": v2["exact"], "f1": v2["f1"], "n_questions": len(examples),
            "n_unanswered": sum(ex.id not in predictions for ex in examples), "squad_v2": v2}


def score_files(data_file: str, predictions_file: str, na_prob_file: str | None = None,
                na_prob_thresh: float = 1.0) -> tuple[dict, str | None]:
    """(the official script's output dict, the line it prints about missing predictions or None)
    for a questions file and a predictions file: ``evaluate-v1.1.py``'s, or ``evaluate-v2.0.py``'s
    for data with unanswerable questions."""
    version = squad_version(data_file)  # None: not nested SQuAD JSON (flat rows may lack answers)
    examples = load_file(data_file, "validation", allow_unanswerable=version is None)
    predictions = read_json_object(predictions_file, str, "answer string")
    if is_v2({"version": version}) or not all(ex.answerable for ex in examples):
        na_probs = read_json_object(na_prob_file, (int, float), "probability") if na_prob_file else None
        missing = sum(ex.id not in predictions for ex in examples)
        note = (f"{missing} questions have no prediction; as evaluate-v2.0.py, they are left out of the scores."
                if missing else None)
        try:
            return squad_v2_scores({ex.id: ex.answers for ex in examples}, predictions, na_probs, na_prob_thresh), note
        except ValueError as e:
            raise DataError(f"{na_prob_file}: {e}") from None
    if na_prob_file:
        raise DataError(f"{data_file}: --na-prob-file scores SQuAD v2.0 data; this file has no unanswerable questions")
    scores = squad_scores({ex.id: ex.answers for ex in examples}, predictions)
    note = f"{scores['n_unanswered']} unanswered questions will receive score 0." if scores["n_unanswered"] else None
    return {"exact_match": scores["exact_match"], "f1": scores["f1"]}, note


def read_json_object(path: str, kind: type | tuple[type, ...], what: str) -> dict:
    """A JSON object of question id -> ``kind``; ``DataError`` naming the file otherwise."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in obj.values()):
        raise DataError(f"{path}: must be a JSON object of question id -> {what}")
    return obj
