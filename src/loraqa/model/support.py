"""What loraqa can do exactly for a model: train it (causal LMs only), and which decoding path answers it.

Answers must equal transformers' own greedy ``generate`` run one question at a time. Three paths
do that, fastest first; a model gets the fastest its config and modules allow (:func:`decoding_support`),
and answering checks it on a few real questions before trusting it (``inference.paths``):

- ``shared``: each passage's keys and values kept once beside the rows' cache and read by an
  attention function registered with transformers (``model.prefix_attention``) that mirrors SDPA.
  Models in SDPA mode whose attention takes the registered function get it; one whose attention
  hands it what SDPA would use and it does not mirror (a position bias, attention sinks,
  bidirectional heads) is caught on its first call and moved to ``copies``.
- ``copies``: each row's cache starts with a copy of its passage and the model's own attention
  reads it, SDPA or eager (an eager function may hide the model's own math: Gemma-2's soft-capping,
  GPT-2's scaling by layer), for any model whose layers keep a key/value cache and take position ids.
- ``generate``: transformers' ``generate``, one question at a time: the reference itself, for
  everything else (recurrent or linear-attention layers, caches of their own, shared key/value layers).

Sliding windows and chunked attention: transformers masks them by cache slot, loraqa's batched cache
holds padding between a row's passage and its question, so slots are not positions. Where no query is
farther from the first key than the smallest window, a window masks nothing: such questions run on the
fast paths with the windows lifted (:func:`windows_lifted`); longer ones go to ``generate``.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

from loraqa.model.load import cache_kwarg

PATHS = ("shared", "copies", "generate")
ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention"}
WINDOW_KEYS = ("sliding_window", "attention_chunk_size")
NO_WINDOW = 1 << 30  # a window no sequence reaches: the mask it makes is the plain causal one


@dataclass(frozen=True)
class DecodingSupport:
    path: str                  # "shared" | "copies" | "generate"
    why: str                   # one line: what decided it
    window: int | None = None  # the smallest sliding window or attention chunk (tokens)
    checked: bool = False      # answers checked against transformers' generate (``inference.paths``)

    def fits(self, tokens: int) -> bool:
        """Whether a question of ``tokens`` (prompt + longest answer) can take the fast paths."""
        return self.window is None or tokens <= self.window

    def fallback(self, why: str) -> DecodingSupport:
        """The next slower path."""
        return DecodingSupport(PATHS[PATHS.index(self.path) + 1], why, self.window, self.checked)


def base_model(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def layer_types(lm) -> tuple[list[str], list[int]]:
    """(each layer's cache type as transformers names it, the windows of the windowed ones)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, kwargs = get_layer_types_and_kwargs(lm.config.get_text_config(decoder=True))
    return list(types), [k["sliding_window"] for k in kwargs if k.get("sliding_window")]


def decoding_support(lm) -> DecodingSupport:
    """The fastest path that can be exact for ``lm`` (a transformers causal LM), from its config and modules."""
    lm = base_model(lm)
    impl = lm.config._attn_implementation
    types, windows = layer_types(lm)
    window = min(windows) if windows else None
    others = sorted(set(types) - ATTENTION_LAYERS)
    if others:
        return DecodingSupport("generate", f"its layers of type {', '.join(others)} keep a cache of their own", window)
    if not type(lm)._supports_default_dynamic_cache():
        return DecodingSupport("generate", f"{type(lm).__name__} keeps a cache of its own", window)
    params = inspect.signature(type(lm).forward).parameters
    if "position_ids" not in params or cache_kwarg(lm) not in params:
        return DecodingSupport("generate", "its forward takes no position ids or no cache", window)
    if impl not in ("sdpa", "eager"):
        return DecodingSupport("generate", f"its attention runs in '{impl}' mode", window)
    if not getattr(lm, "_supports_attention_backend", False):
        return DecodingSupport("copies", "its attention takes no registered function", window)
    if impl == "eager":
        return DecodingSupport("copies", "its attention is eager (the model's own function)", window)
    return DecodingSupport("shared", "SDPA attention", window)


@contextmanager
def windows_lifted(lm, lift: bool = True):
    """Inside the block, ``lm``'s masks are built with no sliding window or attention chunk (for
    questions that fit the smallest one, where they mask nothing: see the module's docstring)."""
    if not lift:
        yield
        return
    configs = {id(c): c for c in (lm.config, lm.config.get_text_config(decoder=True), lm.get_decoder().config)}
    saved = [(c, k, getattr(c, k)) for c in configs.values() for k in WINDOW_KEYS if getattr(c, k, None)]
    for c, k, _ in saved:
        setattr(c, k, NO_WINDOW)
    try:
        yield
    finally:
        for c, k, v in saved:
            setattr(c, k, v)
