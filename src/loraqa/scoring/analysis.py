"""Error analysis of a predictions set: EM/F1 by question type and length buckets, and the worst cases.

No torch import: reports recompute nothing but read what this writes into ``metrics.json``.
"""

from __future__ import annotations

import re
from collections import defaultdict

from loraqa.data.examples import Example
from loraqa.scoring.squad_v1 import normalize_answer, score_question

QUESTION_TYPES = ["how many/much", "what", "which", "who", "when", "where", "why", "how", "other"]
ANSWER_BUCKETS = [(1, 1), (2, 3), (4, 6), (7, None)]          # words in the first gold answer
CONTEXT_BUCKETS = [(0, 99), (100, 149), (150, 199), (200, None)]  # words in the context


NO_ANSWER = "no answer"  # the bucket of unanswerable questions (SQuAD v2.0)


def question_type(question: str) -> str:
    """The first wh-word of the question ('how many'/'how much' before 'how'); else 'other'."""
    q = question.lower()
    if re.search(r"\bhow (many|much)\b", q):
        return "how many/much"
    words = re.findall(r"[a-z]+", q)
    for word in words:
        if word in ("what", "which", "who", "whom", "whose", "when", "where", "why", "how"):
            return "who" if word in ("whom", "whose") else word
    return "other"


def bucket_label(n: int, buckets: list[tuple[int, int | None]]) -> str:
    for lo, hi in buckets:
        if n >= lo and (hi is None or n <= hi):
            return f"{lo}+" if hi is None else (f"{lo}" if lo == hi else f"{lo}-{hi}")
    raise ValueError(f"{n} falls in no bucket")


def analyse(examples: list[Example], predictions: dict[str, str], worst: int = 10) -> dict:
    """Per-bucket EM/F1 (x 100, with counts), shares of odd predictions, and the worst questions."""
    groups: dict[str, dict[str, list[tuple[float, float]]]] = {
        "by_question_type": defaultdict(list), "by_answer_words": defaultdict(list),
        "by_context_words": defaultdict(list)}
    scored = []
    empty = not_in_context = 0
    for ex in examples:
        pred = predictions.get(ex.id, "")
        # an unanswerable question is right when the prediction is empty (the v2.0 rule)
        em, f1 = score_question(pred, ex.answers) if ex.answerable else (float(not normalize_answer(pred)),) * 2
        groups["by_question_type"][question_type(ex.question)].append((em, f1))
        answer_bucket = bucket_label(len(ex.answer.split()), ANSWER_BUCKETS) if ex.answerable else NO_ANSWER
        groups["by_answer_words"][answer_bucket].append((em, f1))
        groups["by_context_words"][bucket_label(len(ex.context.split()), CONTEXT_BUCKETS)].append((em, f1))
        empty += not pred.strip()
        not_in_context += bool(pred.strip()) and normalize_answer(pred) not in normalize_answer(ex.context)
        scored.append((f1, ex, pred))
    n = max(len(examples), 1)
    result: dict = {
        "empty_prediction_share": empty / n,
        "not_in_context_share": not_in_context / n,
    }
    orders = {"by_question_type": QUESTION_TYPES,
              "by_answer_words": [bucket_label(lo, ANSWER_BUCKETS) for lo, _ in ANSWER_BUCKETS] + [NO_ANSWER],
              "by_context_words": [bucket_label(lo, CONTEXT_BUCKETS) for lo, _ in CONTEXT_BUCKETS]}
    for name, group in groups.items():
        result[name] = {
            key: {"n": len(group[key]),
                  "exact_match": 100 * sum(e for e, _ in group[key]) / len(group[key]),
                  "f1": 100 * sum(f for _, f in group[key]) / len(group[key])}
            for key in orders[name] if group.get(key)}
    scored.sort(key=lambda t: t[0])  # stable: ties stay in file order
    result["worst"] = [{"id": ex.id, "question": ex.question, "prediction": pred, "golds": list(dict.fromkeys(ex.answers)),
                        "f1": 100 * f1, "context": _snippet(ex)} for f1, ex, pred in scored[:worst]]
    return result


def _snippet(ex: Example, width: int = 160) -> str:
    """The context around the first gold answer."""
    start = ex.answer_starts[0] if ex.answer_starts else 0
    lo = max(0, start - width // 2)
    hi = min(len(ex.context), start + len(ex.answer) + width // 2)
    return ("..." if lo else "") + ex.context[lo:hi] + ("..." if hi < len(ex.context) else "")
