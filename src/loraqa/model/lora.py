"""Thin wrapper over PEFT's LoRA: attach, load, merge, the per-architecture targets, and the
prompt settings saved beside an adapter (``loraqa.json``) so that using it reproduces its prompts.

What this hides: GPT-2's ``c_attn`` is a ``transformers.pytorch_utils.Conv1D`` whose weight is
stored (in, out), the transpose of ``nn.Linear``; PEFT needs ``fan_in_fan_out=True`` for it, which
:func:`add_lora` sets whenever a targeted module is a Conv1D.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from torch import nn

from loraqa.config import Config
from loraqa.io import log, save_dir_atomic
from loraqa.model.load import count_parameters, load_base, load_model
from loraqa.model.precision import DTYPES
from loraqa.model.weights import check_base_weights

ALL_LINEAR = "all-linear"
SPAN_HEAD = "qa_outputs"  # transformers' name for the start/end head of *ForQuestionAnswering
ADAPTER_SETTINGS = "loraqa.json"  # beside the adapter: how prompts were built for it
# what of a run's settings ``adapter_settings`` hands to a later evaluate / ask / serve / merge
PROMPT_SETTINGS = ("template", "max_length", "no_answer_text", "method", "doc_stride", "window_tokens",
                   "windows_per_question")


# attention projections by their usual names, for families PEFT has no defaults for: the query and
# value projections (PEFT's own choice for Llama and most others), or the fused one
ATTENTION_TARGETS = (["q_proj", "v_proj"], ["qkv_proj"], ["query_key_value"], ["Wqkv"], ["c_attn"])


def default_target_modules(model) -> list[str]:
    """PEFT's default LoRA targets for this architecture (``c_attn`` for GPT-2); for a family PEFT
    does not list (Phi-3, OLMo-2, Granite, SmolLM3, ...), its attention projections by their usual names."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = model.config.model_type
    if model_type in DEFAULTS:
        return list(DEFAULTS[model_type])
    names = _leaf_names(model)
    for targets in ATTENTION_TARGETS:
        if all(t in names for t in targets):
            return list(targets)
    raise ValueError(f"no default LoRA targets for model type '{model_type}'; pass --target-modules")


def _matches(name: str, targets: list[str]) -> bool:
    # PEFT's rule for a list of names: the module's name equals a target or ends with ".target"
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(model, r: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.1,
             target_modules: list[str] | None = None, use_rslora: bool = False):
    """Freeze ``model`` and attach LoRA adapters to ``target_modules``; returns a PeftModel.

    ``["all-linear"]`` targets every linear layer but the output head (PEFT's own shorthand). A
    model with a span head (``qa_outputs``) gets PEFT's question-answering task: the head is
    trained in full and saved with the adapter.
    """
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = list(target_modules) if target_modules else default_target_modules(model)
    if targets == [ALL_LINEAR]:
        named = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, (nn.Linear, Conv1D)) and m is not model.get_output_embeddings()
                 and not n.endswith(SPAN_HEAD)]
        matched = [m for _, m in named]
        # PEFT's shorthand would also adapt a span head, which is trained in full: name the layers instead
        targets = sorted({n.rsplit(".", 1)[-1] for n, _ in named}) if hasattr(model, SPAN_HEAD) else ALL_LINEAR
    else:
        matched = [m for n, m in model.named_modules() if _matches(n, targets)]
    if not matched:
        raise ValueError(f"--target-modules {','.join(targets)} match no module of {model.config.model_type}; "
                         f"names there include: {', '.join(sorted(_leaf_names(model))[:20])}")
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets, use_rslora=use_rslora,
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in matched),
        bias="none", task_type="QUESTION_ANS" if hasattr(model, SPAN_HEAD) else "CAUSAL_LM")
    return get_peft_model(model, config)


def _leaf_names(model) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and not list(m.children())}


def load_adapter(model, adapter_dir: str | Path, config: Config | None = None):
    """A saved adapter (PEFT ``save_pretrained`` folder) on top of ``model``, for inference. With
    ``config`` (the settings ``model`` was loaded with), the base weights the adapter was trained on,
    where its ``loraqa.json`` records them, must be ``model``'s (``model.weights``)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ValueError(f"--adapter {adapter_dir}: no adapter_config.json there (not a PEFT adapter folder)")
    if config is not None:
        check_base_weights(config, adapter_dir, recorded_weights(adapter_dir))
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError) as e:  # shape or name mismatches: made for another base model
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise ValueError(f"--adapter {adapter_dir} was made for another base model: {detail}") from None


def merge_for_answering(model, precision: str = "fp32"):
    """A LoRA PeftModel as a plain model for answering: each adapter's ``scale * B @ A`` added into
    its layer's weight (PEFT's ``merge_and_unload``), so decoding runs the base model's products
    alone, with no adapter modules or their Python at every step. Anything else is returned as
    it is: a span head's model keeps its wrapper (its head is trained in full, not merged).

    The layers that carry LoRA are first stored in ``precision``'s dtype and the fp32 delta added
    to that, which is what a run's own final evaluation merges (its frozen weights are already
    stored so): ``loraqa evaluate`` of the saved adapter reproduces the run's predictions.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel) or model.peft_config[model.active_adapter].task_type != "CAUSAL_LM":
        return model
    dtype = DTYPES[precision]
    for module in model.modules():
        base = module.get_base_layer() if isinstance(module, LoraLayer) else None
        if base is not None and base.weight.dtype != dtype:
            base.weight = nn.Parameter(base.weight.detach().to(dtype), requires_grad=False)
    return merge_lora(model)


def merge_lora(peft_model):
    """PEFT's ``merge_and_unload``: each LoRA delta added into its weight, a plain model back."""
    with warnings.catch_warnings():  # PEFT warns whenever a model with a tied head is merged: nothing to act on
        warnings.filterwarnings("ignore", message="Input and output embeddings are no longer tied")
        return peft_model.merge_and_unload()


def prepare_model(model, config):
    """Apply ``config.method``: LoRA adapters (with the config's LoRA settings), or every weight
    trainable ('full')."""
    if config.method in ("lora", "span"):
        return add_lora(model, config.r, config.lora_alpha, config.lora_dropout, config.target_modules,
                        config.use_rslora)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def parameter_counts(model, base_total: int) -> dict[str, float]:
    """Trainable parameters against the *base* model's size (adapters not counted in the total)."""
    trainable, _ = count_parameters(model)
    return {"trainable_params": trainable, "total_params": base_total,
            "trainable_percent": 100.0 * trainable / base_total}


def count_trainable(config: Config) -> dict[str, float]:
    """``parameter_counts`` of the settings' model with its method applied (``loraqa params``)."""
    model = load_model(config.model, config.init, config.seed)
    base_total = count_parameters(model)[1]
    return parameter_counts(prepare_model(model, config), base_total)


def recorded_weights(adapter: str | Path) -> dict | None:
    """The base weights an adapter was trained on, as its run recorded them (None: not recorded)."""
    path = Path(adapter) / ADAPTER_SETTINGS
    return json.loads(path.read_text()).get("base_weights") if path.is_file() else None


def adapter_settings(adapter: str | Path | None) -> dict:
    """The prompt settings saved beside an adapter (empty for none, or for adapters made elsewhere)."""
    path = Path(adapter) / ADAPTER_SETTINGS if adapter else None
    if path is None or not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    return {k: saved[k] for k in PROMPT_SETTINGS if k in saved}


def merge(config: Config, adapter: str, output_dir: str) -> Path:
    """Base model + adapter -> a plain transformers model folder (safetensors + tokenizer)."""
    model, tokenizer, _ = load_base(config)
    merged = merge_lora(load_adapter(model, adapter, config))
    target = Path(output_dir)
    settings = Path(adapter) / ADAPTER_SETTINGS

    def write(folder: Path) -> None:
        merged.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        if settings.is_file():  # keep the prompt settings with the merged model
            (folder / ADAPTER_SETTINGS).write_text(settings.read_text())

    save_dir_atomic(target, write)
    log(f"merged {adapter} into {config.model}: {target}")
    return target
