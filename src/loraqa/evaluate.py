"""The evaluate job (``loraqa evaluate``): a model, or a model plus a trained adapter, answers every
question of ``--eval-file``; its run folder gets the predictions and the metrics."""

from __future__ import annotations

from loraqa.config import Config
from loraqa.inference.answerer import load_answerer
from loraqa.inference.evaluation import evaluate
from loraqa.runs import claim_output_dir, load_questions, write_results
from loraqa.io import write_json_atomic
from loraqa.model.weights import RECORD as WEIGHTS_RECORD
from loraqa.model.weights import weights_record
from loraqa.runtime import peak_memory_mb


def run_evaluate(config: Config, adapter: str | None = None, progress: bool = True) -> dict:
    """Evaluate the base model, or the base model plus ``adapter``; writes predictions + metrics."""
    out = claim_output_dir(config)
    examples = load_questions(config, "validation")
    answerer = load_answerer(config, adapter, examples)
    predictions, na_probs, metrics = evaluate(answerer.model, answerer.tokenizer, examples, answerer.settings,
                                              answerer.device, answerer.precision, progress=progress)
    metrics.update({"method": "adapter" if adapter else "zero-shot", "adapter": str(adapter) if adapter else None,
                    "trainable_params": 0, "total_params": answerer.base_params, "trainable_percent": 0.0,
                    "device": str(answerer.device), "precision": answerer.precision,
                    "precision_reason": answerer.precision_reason, "max_length": answerer.settings.max_length,
                    "peak_memory_mb": peak_memory_mb(answerer.device)})
    write_results(out, predictions, metrics, na_probs)
    write_json_atomic(out / WEIGHTS_RECORD, weights_record(config))  # the weights these answers came from
    return metrics
