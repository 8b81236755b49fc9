"""Answer every question of a set and score it: the predictions and the metrics of a run."""

from __future__ import annotations

import time

import torch

from loraqa.data.examples import Example
from loraqa.inference.documents import read
from loraqa.inference.settings import DecodeSettings
from loraqa.model.span import answer_spans
from loraqa.scoring.analysis import analyse
from loraqa.scoring.score import score
from loraqa.training.processes import Processes


def evaluate(model, tokenizer, examples: list[Example], settings: DecodeSettings, device: torch.device,
             precision: str, *, processes: Processes | None = None, progress: bool = True
             ) -> tuple[dict[str, str], dict[str, float], dict]:
    """(predictions, no-answer probabilities, metrics) over *all* ``examples``; with several
    processes each decodes a share.

    A question whose prompt cannot fit the budget even without context gets the empty answer (it
    scores 0, as a missing prediction does in the official script) and is counted; its no-answer
    probability is 1.0. With unanswerable questions the scores are v2.0's, with the best no-answer
    thresholds (the probabilities are the official script's ``--na-prob-file``). ``method='span'``
    reads the answers off a span head (windows of ``doc_stride``, spans of at most
    ``max_new_tokens`` tokens; "no answer" only where ``examples`` have unanswerable questions).
    """
    processes = processes or Processes.single()
    start = time.perf_counter()
    probs: dict[str, float] = {}
    route = {"path": settings.method, "generate": 0}
    windows = {}
    show = progress and processes.is_main
    if settings.method == "span":
        share = examples[processes.rank::processes.world]
        mine, stats = answer_spans(model, tokenizer, share, max_length=settings.max_length,
                                   doc_stride=settings.doc_stride, batch_size=settings.batch_size, device=device,
                                   precision=precision, allow_no_answer=not all(ex.answerable for ex in examples),
                                   max_answer_tokens=settings.max_new_tokens, na_probs=probs, progress=show)
        counts = processes.sum(torch.tensor([stats.windowed, stats.dropped], dtype=torch.float64, device=device))
        stats.windowed, stats.dropped = int(counts[0]), int(counts[1])
        asked = len(examples)  # questions answered, for the rate below
    else:  # each process reads a share of the questions (a long passage in windows: inference.documents)
        done = read(model, tokenizer, examples[processes.rank::processes.world], settings, device, precision,
                    progress=show, route=route)
        mine, stats = done.answers, done.stats
        probs.update(done.na_probs)
        counts = processes.sum(torch.tensor([stats.windowed, stats.dropped, done.documents, done.windows,
                                             done.window_questions, len(mine)], dtype=torch.float64, device=device))
        stats.windowed, stats.dropped = int(counts[0]), int(counts[1])
        windows = {"documents_in_windows": int(counts[2]), "windows": int(counts[3]),
                   "window_questions": int(counts[4])}
        asked = int(counts[5])  # a question too long to ask has no answer
    generated = dict(processes.gather([(qid, (answer, probs[qid])) for qid, answer in mine.items()]))
    seconds = time.perf_counter() - start
    predictions = {ex.id: generated.get(ex.id, ("", 1.0))[0] for ex in examples}  # file order
    na_probs = {ex.id: generated.get(ex.id, ("", 1.0))[1] for ex in examples}
    metrics = score(examples, predictions, na_probs)
    metrics.update({
        "eval_seconds": seconds,
        "eval_questions_per_second": asked / seconds if seconds > 0 else 0.0,
        "eval_windowed": stats.windowed,
        "eval_dropped": stats.dropped,
        "empty_predictions": sum(1 for p in predictions.values() if not p),
        # how the questions were answered (inference.paths): the path, and how many went to transformers' generate
        "answering_path": route["path"],
        "eval_generate_questions": int(processes.sum(torch.tensor([route["generate"]], dtype=torch.float64,
                                                                  device=device))[0]),
        "constrain_to_context": settings.constrain_to_context,
        **windows,
        "na_prob_thresh": settings.na_prob_thresh,
        "analysis": analyse(examples, predictions),
    })
    return predictions, na_probs, metrics
