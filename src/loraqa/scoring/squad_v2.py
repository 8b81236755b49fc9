"""SQuAD v2.0 scores, exactly as the official ``evaluate-v2.0.py`` computes them.

The rules that differ from v1.1 (``squad_v1.py``):

* a gold answer that normalises to nothing is dropped; a question left with none (an unanswerable
  question, or one whose golds are all punctuation or articles) has the single gold ``""``;
* F1 is ``int(gold_tokens == prediction_tokens)`` when either side has no tokens, so an empty
  prediction scores 1 on an unanswerable question and 0 on an answerable one;
* with no-answer probabilities, a question whose probability is above ``na_prob_thresh`` counts as
  answered "no answer" (1 when it has no answer, else 0), and ``best_*`` report the best score
  over all thresholds, with the threshold.

Missing predictions, as the script: a question without a prediction is *skipped* (the script prints
"Missing prediction for ...") and ``exact``, ``f1`` and ``total`` are over the predicted questions
only. The script then stops with a KeyError while splitting HasAns/NoAns; here each split is
over its predicted questions instead. Callers that want missing answers scored as wrong should
predict "" for them (that is the "no answer" prediction, scored 1 on unanswerable questions).

No torch import. Percentages are 100 x the mean, as in the script; an empty set scores 0.0 where the
script would divide by zero.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping

from loraqa.scoring.squad_v1 import normalize_answer


def get_tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def compute_exact(a_gold: str, a_pred: str) -> int:
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    gold_toks, pred_toks = get_tokens(a_gold), get_tokens(a_pred)
    if not gold_toks or not pred_toks:  # either is "no answer": 1 if both are, else 0
        return int(gold_toks == pred_toks)
    num_same = sum((Counter(gold_toks) & Counter(pred_toks)).values())
    if num_same == 0:
        return 0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def gold_answers(answers: Iterable[str]) -> list[str]:
    """The golds that count: those that normalise to something, else ``[""]``."""
    return [a for a in answers if normalize_answer(a)] or [""]


def get_raw_scores(golds: Mapping[str, Iterable[str]],
                   predictions: Mapping[str, str]) -> tuple[dict[str, int], dict[str, float]]:
    """Per-question exact and F1 (max over golds), for the questions that have a prediction."""
    exact_scores: dict[str, int] = {}
    f1_scores: dict[str, float] = {}
    for qid, answers in golds.items():
        if qid not in predictions:
            continue  # the script prints "Missing prediction for <qid>" and skips it
        kept, a_pred = gold_answers(answers), predictions[qid]
        exact_scores[qid] = max(compute_exact(a, a_pred) for a in kept)
        f1_scores[qid] = max(compute_f1(a, a_pred) for a in kept)
    return exact_scores, f1_scores


def apply_no_ans_threshold(scores: Mapping[str, float], na_probs: Mapping[str, float],
                           qid_to_has_ans: Mapping[str, bool], na_prob_thresh: float) -> dict[str, float]:
    """A question whose no-answer probability is above the threshold scores 1 iff it has no answer."""
    new_scores = {}
    for qid, s in scores.items():
        if na_probs[qid] > na_prob_thresh:
            new_scores[qid] = float(not qid_to_has_ans[qid])
        else:
            new_scores[qid] = s
    return new_scores


def make_eval_dict(exact_scores: Mapping[str, float], f1_scores: Mapping[str, float],
                   qid_list: list[str] | None = None) -> dict[str, float]:
    qids = list(exact_scores) if qid_list is None else qid_list
    total = len(qids)
    return {
        "exact": 100.0 * sum(exact_scores[k] for k in qids) / total if total else 0.0,
        "f1": 100.0 * sum(f1_scores[k] for k in qids) / total if total else 0.0,
        "total": total,
    }


def find_best_thresh(predictions: Mapping[str, str], scores: Mapping[str, float],
                     na_probs: Mapping[str, float], qid_to_has_ans: Mapping[str, bool]) -> tuple[float, float]:
    """The best score over all thresholds, and the threshold (the script's sweep, step for step).

    Threshold below every probability: every question answers "no answer", so the score starts at
    the number of unanswerable questions. Raising it past each question in order of probability
    lets that question's own prediction count: + its score when it has an answer; - 1 when it has
    none and the prediction is a non-empty string (not normalised, as the script), else 0.
    """
    cur_score = best_score = sum(1 for has in qid_to_has_ans.values() if not has)
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):  # stable: ties keep the dict's order
        if qid not in scores:
            continue
        if qid_to_has_ans[qid]:
            diff = scores[qid]
        else:
            diff = -1 if predictions[qid] else 0
        cur_score += diff
        if cur_score > best_score:
            best_score = cur_score
            best_thresh = na_probs[qid]
    return (100.0 * best_score / len(scores) if scores else 0.0), best_thresh


def squad_v2_scores(golds: Mapping[str, Iterable[str]], predictions: Mapping[str, str],
                    na_probs: Mapping[str, float] | None = None, na_prob_thresh: float = 1.0) -> dict[str, float]:
    """The script's output dict: exact, f1, total, HasAns_*/NoAns_* (when present), best_* (with na_probs).

    ``golds`` maps each question id to its gold texts, empty for an unanswerable question.
    Without ``na_probs`` every prediction has probability 0.0, as in the script.
    """
    golds = {qid: list(answers) for qid, answers in golds.items()}
    qid_to_has_ans = {qid: bool(answers) for qid, answers in golds.items()}
    has_ans_qids = [k for k, v in qid_to_has_ans.items() if v]
    no_ans_qids = [k for k, v in qid_to_has_ans.items() if not v]
    probs = {k: 0.0 for k in predictions} if na_probs is None else na_probs
    exact_raw, f1_raw = get_raw_scores(golds, predictions)
    missing = [qid for qid in exact_raw if qid not in probs]
    if missing:
        raise ValueError(f"no no-answer probability for {len(missing)} predicted questions, e.g. {missing[0]}")
    exact_thresh = apply_no_ans_threshold(exact_raw, probs, qid_to_has_ans, na_prob_thresh)
    f1_thresh = apply_no_ans_threshold(f1_raw, probs, qid_to_has_ans, na_prob_thresh)
    out = make_eval_dict(exact_thresh, f1_thresh)
    for prefix, qids in (("HasAns", has_ans_qids), ("NoAns", no_ans_qids)):
        if qids:  # the script's splits; over the predicted questions (the script: KeyError if any is missing)
            split = make_eval_dict(exact_thresh, f1_thresh, [k for k in qids if k in exact_thresh])
            out.update({f"{prefix}_{k}": v for k, v in split.items()})
    if na_probs is not None:
        out["best_exact"], out["best_exact_thresh"] = find_best_thresh(predictions, exact_raw, probs, qid_to_has_ans)
        out["best_f1"], out["best_f1_thresh"] = find_best_thresh(predictions, f1_raw, probs, qid_to_has_ans)
    return out
