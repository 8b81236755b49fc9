"""Generate an answer for every question and score it: predictions.json + the metrics."""

from __future__ import annotations

import time

import torch

from loraqa.analysis import analyse
from loraqa.data import Example
from loraqa.distributed import Processes
from loraqa.features import build_eval_features
from loraqa.generate import predict
from loraqa.metrics import squad_scores
from loraqa.metrics_v2 import squad_v2_scores
from loraqa.span import answer_spans


def evaluate(model, tokenizer, examples: list[Example], *, template: str, max_length: int,
             max_new_tokens: int, batch_size: int, device: torch.device, precision: str,
             progress: bool = True, processes: Processes | None = None,
             batch_tokens: int | None = None, no_answer_text: str = "",
             na_probs: dict[str, float] | None = None, constrain_to_context: bool = False,
             method: str = "lora", doc_stride: int = 128,
             na_prob_thresh: float | None = None) -> tuple[dict[str, str], dict]:
    """(predictions, metrics) over *all* ``examples``; with several processes each decodes a share.

    A question whose prompt cannot fit the budget even without context gets the empty answer
    (it scores 0, as a missing prediction does in the official script) and is counted. With
    unanswerable questions the scores are v2.0's, with the best no-answer thresholds; ``na_probs``,
    when given, is filled with every question's no-answer probability (the script's
    ``--na-prob-file``; 1.0 for a question too long to ask). ``constrain_to_context`` holds every
    answer to a span of its passage. ``method='span'`` reads the answers off a span head instead
    (windows of ``doc_stride``, spans of at most ``max_new_tokens`` tokens; "no answer" only
    where ``examples`` have unanswerable questions). ``na_prob_thresh``: "no answer" exactly where
    its probability is above it (generation).
    """
    processes = processes or Processes.single()
    start = time.perf_counter()
    probs: dict[str, float] = {}
    show = progress and processes.is_main
    if method == "span":
        share = examples[processes.rank::processes.world]
        mine, stats = answer_spans(model, tokenizer, share, max_length=max_length, doc_stride=doc_stride,
                                   batch_size=batch_size, device=device, precision=precision,
                                   allow_no_answer=not all(ex.answerable for ex in examples),
                                   max_answer_tokens=max_new_tokens, na_probs=probs, progress=show)
        counts = processes.sum(torch.tensor([stats.windowed, stats.dropped], dtype=torch.float64))
        stats.windowed, stats.dropped = int(counts[0]), int(counts[1])
        asked = len(examples)  # questions answered, for the rate below
    else:
        features, stats = build_eval_features(tokenizer, examples, template, max_length, max_new_tokens)
        mine = predict(model, tokenizer, features[processes.rank::processes.world], batch_size, max_new_tokens,
                       device, precision, show, batch_tokens, no_answer_text, probs,
                       {ex.id: ex.context for ex in examples} if constrain_to_context else None,
                       na_prob_thresh)
        asked = len(features)  # a question too long to ask has no feature
    generated = dict(processes.gather([(qid, (answer, probs[qid])) for qid, answer in mine.items()]))
    seconds = time.perf_counter() - start
    predictions = {ex.id: generated.get(ex.id, ("", 1.0))[0] for ex in examples}  # file order
    probs = {ex.id: generated.get(ex.id, ("", 1.0))[1] for ex in examples}
    if na_probs is not None:
        na_probs.update(probs)
    metrics = score(examples, predictions, probs)
    metrics.update({
        "eval_seconds": seconds,
        "eval_questions_per_second": asked / seconds if seconds > 0 else 0.0,
        "eval_windowed": stats.windowed,
        "eval_dropped": stats.dropped,
        "empty_predictions": sum(1 for p in predictions.values() if not p),
        "constrain_to_context": constrain_to_context,
        "na_prob_thresh": na_prob_thresh,
        "analysis": analyse(examples, predictions),
    })
    return predictions, metrics


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

