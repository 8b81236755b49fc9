"""SQuAD v1.1 exact match and F1, exactly as the official ``evaluate-v1.1.py`` computes them.

No torch import: scoring a predictions file needs only this module and ``data``.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable, Mapping

_PUNCTUATION = set(string.punctuation)  # ASCII only, as in the official script


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse white space."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def max_over_ground_truths(metric, prediction: str, ground_truths: Iterable[str]) -> float:
    return max(metric(prediction, gt) for gt in ground_truths)


def score_question(prediction: str, ground_truths: Iterable[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction, each the max over all gold answers, in [0, 1]."""
    golds = list(ground_truths)
    return (max_over_ground_truths(exact_match_score, prediction, golds),
            max_over_ground_truths(f1_score, prediction, golds))


def squad_scores(golds: Mapping[str, Iterable[str]], predictions: Mapping[str, str]) -> dict[str, float]:
    """Mean over *all* questions in ``golds`` x 100; a question without a prediction scores 0.

    Returns ``exact_match``, ``f1``, ``n_questions`` and ``n_unanswered``.
    """
    em = f1 = 0.0
    unanswered = 0
    for qid, answers in golds.items():
        if qid not in predictions:
            unanswered += 1
            continue
        q_em, q_f1 = score_question(predictions[qid], answers)
        em += q_em
        f1 += q_f1
    total = len(golds)
    return {
        "exact_match": 100.0 * em / total if total else 0.0,
        "f1": 100.0 * f1 / total if total else 0.0,
        "n_questions": total,
        "n_unanswered": unanswered,
    }
