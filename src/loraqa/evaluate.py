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
    metrics = squad_scores({ex.id: ex.answers for ex in examples}, predictions)
    metrics.update({
        "eval_seconds": seconds,
        "eval_questions_per_second": len(features) / seconds if seconds > 0 else 0.0,
        "eval_windowed": stats.windowed,
        "eval_dropped": stats.dropped,
        "empty_predictions": sum(1 for p in predictions.values() if not p),
        "analysis": analyse(examples, predictions),
    })
    return predictions, metrics
