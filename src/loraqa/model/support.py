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
GPT-Neo's local layers are such windows in its own words (``attention_layers``, ``window_size``), kept
as a mask built at load and read by cache slot: lifted the same way, by swapping that mask.

Rope scaling that changes with the sequence: transformers picks LongRoPE's long factors (Phi-3-128k)
once the longest position of a forward passes ``original_max_position_embeddings``, and grows dynamic
NTK's frequencies past ``max_position_embeddings``: in a batch, for every row at once, so one long
prompt would move its short neighbours' answers. Questions up to that length run on the fast paths
(every row of their batches stays below it, as each alone does); longer ones go to ``generate``.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from loraqa.model.load import base_model, cache_kwarg

PATHS = ("shared", "copies", "generate")
ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention"}
WINDOW_KEYS = ("sliding_window", "attention_chunk_size")
NO_WINDOW = 1 << 30  # a window no sequence reaches: the mask it makes is the plain causal one
LOCAL = ("attention_layers", "local", "window_size")  # GPT-Neo: (the layers' list, its local kind, their window)


@dataclass(frozen=True)
class DecodingSupport:
    path: str                  # "shared" | "copies" | "generate"
    why: str                   # one line: what decided it
    window: int | None = None  # the smallest sliding window, attention chunk or local window (tokens)
    checked: bool = False      # answers checked against transformers' generate (``inference.paths``)
    rope: tuple[str, int] | None = None  # (rope scaling, the length past which it changes every row's positions)

    @property
    def longest(self) -> int | None:
        """The longest question (prompt + answer, tokens) the fast paths answer exactly."""
        return min((n for n in (self.window, self.rope and self.rope[1]) if n is not None), default=None)

    def fits(self, tokens: int) -> bool:
        """Whether a question of ``tokens`` (prompt + longest answer) can take the fast paths."""
        return self.longest is None or tokens <= self.longest

    def too_long(self) -> str:
        """Why a question that does not fit goes to ``generate``, for a log line."""
        if self.window is not None and self.window == self.longest:
            return f"longer than the model's {self.window}-token window"
        return f"longer than the {self.longest} tokens past which its rope scaling ({self.rope[0]}) moves every row"

    def fallback(self, why: str) -> DecodingSupport:
        """The next slower path."""
        return replace(self, path=PATHS[PATHS.index(self.path) + 1], why=why)


def layer_types(lm) -> tuple[list[str], list[int]]:
    """(each layer's cache type as transformers names it, the windows of the windowed ones)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    config = lm.config.get_text_config(decoder=True)
    types, kwargs = get_layer_types_and_kwargs(config)
    layers, local, key = LOCAL
    local_window = [getattr(config, key)] if local in (getattr(config, layers, None) or ()) else []
    return list(types), [k["sliding_window"] for k in kwargs if k.get("sliding_window")] + local_window


def rope_scaling(lm) -> tuple[str, int] | None:
    """(rope type, the longest sequence it leaves alone) where transformers' rope changes with the
    longest position of a forward: LongRoPE's long factors past ``original_max_position_embeddings``,
    dynamic NTK's frequencies past ``max_position_embeddings`` (``modeling_rope_utils.dynamic_rope_update``)."""
    config = lm.config.get_text_config(decoder=True)
    params = getattr(config, "rope_parameters", None) or {}
    nested = [p for p in params.values() if isinstance(p, dict)]  # per layer type (Gemma-3's local and global)
    limits = []
    for p in nested or [params]:
        kind = p.get("rope_type", p.get("type"))
        if kind == "longrope":
            limits.append((kind, p.get("original_max_position_embeddings")
                           or getattr(config, "original_max_position_embeddings", None)))
        elif kind and "dynamic" in kind:
            limits.append((kind, config.max_position_embeddings))
    return min((x for x in limits if x[1]), key=lambda x: x[1], default=None)


def passages_apart_differ(lm) -> str | None:
    """Why running a passage apart from its questions (training's ``--group-by-passage``, which
    prefills the passages, then the questions over their keys and values) would not compute what one
    forward over each whole prompt does, or None: a rope that changes with a forward's longest
    position gives the passages' forward other frequencies than the questions'."""
    rope = rope_scaling(lm)
    if rope is None:
        return None
    return (f"{rope[0]} rope changes with a forward's longest position (past {rope[1]} tokens), so passages run "
            "apart from their questions would take other frequencies than one forward gives them")


def decoding_support(lm) -> DecodingSupport:
    """The fastest path that can be exact for ``lm`` (a transformers causal LM), from its config and modules."""
    lm = base_model(lm)
    impl = lm.config._attn_implementation
    types, windows = layer_types(lm)
    limits = {"window": min(windows) if windows else None, "rope": rope_scaling(lm)}
    others = sorted(set(types) - ATTENTION_LAYERS)
    if others:
        return DecodingSupport("generate", f"its layers of type {', '.join(others)} keep a cache of their own",
                               **limits)
    if not type(lm)._supports_default_dynamic_cache():
        return DecodingSupport("generate", f"{type(lm).__name__} keeps a cache of its own", **limits)
    params = inspect.signature(type(lm).forward).parameters
    if "position_ids" not in params or cache_kwarg(lm) not in params:
        return DecodingSupport("generate", "its forward takes no position ids or no cache", **limits)
    if impl not in ("sdpa", "eager"):
        return DecodingSupport("generate", f"its attention runs in '{impl}' mode", **limits)
    if not getattr(lm, "_supports_attention_backend", False):
        return DecodingSupport("copies", "its attention takes no registered function", **limits)
    if impl == "eager":
        return DecodingSupport("copies", "its attention is eager (the model's own function)", **limits)
    return DecodingSupport("shared", "SDPA attention", **limits)


@contextmanager
def windows_lifted(lm, lift: bool = True):
    """Inside the block, ``lm``'s masks are built with no sliding window, attention chunk or local
    window (for questions that fit the smallest one, where they mask nothing: see the module's docstring)."""
    if not lift:
        yield
        return
    configs = {id(c): c for c in (lm.config, lm.config.get_text_config(decoder=True), lm.get_decoder().config)}
    saved = [(c, k, getattr(c, k)) for c in configs.values() for k in WINDOW_KEYS if getattr(c, k, None)]
    for c, k, _ in saved:
        setattr(c, k, NO_WINDOW)
    # GPT-Neo's local layers keep their window in a mask made at load (``bias``), sliced by cache slot:
    # one that masks nothing (a view, no memory) leaves them the causal and padding mask all layers get
    for m in base_model(lm).modules():
        if getattr(m, "attention_type", None) == LOCAL[1] and isinstance(getattr(m, "bias", None), torch.Tensor):
            saved.append((m, "bias", m.bias))
            m.bias = torch.ones((), dtype=torch.bool, device=m.bias.device).expand(1, 1, NO_WINDOW, NO_WINDOW)
    try:
        yield
    finally:
        for c, k, v in saved:
            setattr(c, k, v)
