"""The evaluate job (``loraqa evaluate``): a model, or a model plus a trained adapter, answers every
question of ``--eval-file``; its run folder gets the predictions and the metrics."""

from __future__ import annotations

from loraqa.config import Config
from loraqa.inference.answerer import inference_precision
from loraqa.inference.evaluation import evaluate
from loraqa.inference.settings import DecodeSettings
from loraqa.model.load import load_base, resolve_max_length
from loraqa.model.lora import load_adapter
from loraqa.runs import claim_output_dir, load_questions, write_results
from loraqa.runtime import peak_memory_mb
from loraqa.training.processes import Processes


def run_evaluate(config: Config, adapter: str | None = None, progress: bool = True) -> dict:
    """Evaluate the base model, or the base model plus ``adapter``; writes predictions + metrics."""
    out = claim_output_dir(config)
    device = Processes.single().device
    model, tokenizer, base_total = load_base(config)
    settings = DecodeSettings.from_config(config, resolve_max_length(config, model, tokenizer))
    if adapter:
        model = load_adapter(model, adapter)
    model.to(device)
    examples = load_questions(config, "validation")
    precision, why = inference_precision(model, tokenizer, settings, config.precision, device, examples)
    predictions, na_probs, metrics = evaluate(model, tokenizer, examples, settings, device, precision,
                                              progress=progress)
    metrics.update({"method": "adapter" if adapter else "zero-shot", "adapter": str(adapter) if adapter else None,
                    "trainable_params": 0, "total_params": base_total, "trainable_percent": 0.0,
                    "device": str(device), "precision": precision, "precision_reason": why,
                    "max_length": settings.max_length, "peak_memory_mb": peak_memory_mb(device)})
    write_results(out, predictions, metrics, na_probs)
    return metrics
