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


def evaluate(model, tokenizer, examples: list[Example], *, template: str, max_length: int,
             max_new_tokens: int, batch_size: int, device: torch.device, precision: str,
             progress: bool = True, processes: Processes | None = None,
             batch_tokens: int | None = None) -> tuple[dict[str, str], dict]:
    """(predictions, metrics) over *all* ``examples``; with several processes each decodes a share.

    A question whose prompt cannot fit the budget even without context gets the empty answer
    (it scores 0, as a missing prediction does in the official script) and is counted.
    """
    features, stats = build_eval_features(tokenizer, examples, template, max_length, max_new_tokens)
    processes = processes or Processes.single()
    start = time.perf_counter()
    mine = predict(model, tokenizer, features[processes.rank::processes.world], batch_size, max_new_tokens,
                   device, precision, progress and processes.is_main, batch_tokens)
    generated = dict(processes.gather(list(mine.items())))
    seconds = time.perf_counter() - start
    predictions = {ex.id: generated.get(ex.id, "") for ex in examples}  # file order
    metrics = score(examples, predictions)
    metrics.update({
        "eval_seconds": seconds,
        "eval_questions_per_second": len(features) / seconds if seconds > 0 else 0.0,
        "eval_windowed": stats.windowed,
        "eval_dropped": stats.dropped,
        "empty_predictions": sum(1 for p in predictions.values() if not p),
        "analysis": analyse(examples, predictions),
    })
    return predictions, metrics


def score(examples: list[Example], predictions: dict[str, str]) -> dict:
    """The official v1.1 scores; with unanswerable questions, the v2.0 ones (``exact_match`` and ``f1``
    are then v2.0's ``exact`` and ``f1``, and ``squad_v2`` holds the whole v2.0 dict)."""
    golds = {ex.id: ex.answers for ex in examples}
    if all(ex.answerable for ex in examples):
        return squad_scores(golds, predictions)
    v2 = squad_v2_scores(golds, predictions)
    return {"exact_match": v2["exact"], "f1": v2["f1"], "n_questions": len(examples),
            "n_unanswered": sum(ex.id not in predictions for ex in examples), "squad_v2": v2}

