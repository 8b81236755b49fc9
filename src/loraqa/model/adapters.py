"""Several LoRA adapters on one base model, for a server: each checked against the base, loaded at the
start or while serving, and answered together, rows of different adapters in one batch.

PEFT reads an adapter (its config and weights, ``load_peft_weights``) and says each layer's scale
(``rank_pattern``, ``alpha_pattern``, rsLoRA). The layers they target are wrapped in a
:class:`MultiLoRA`, which holds every adapter's A stacked, (K r, in), and its scaled B stacked,
(out, K r). A forward runs the base layer once for all rows, then:

- all rows ask one adapter: two products with its r columns alone (none for the base);
- a decoding step (one token a row) whose rows ask most of the stacked adapters: two products over
  the whole stack, each row keeping only its own adapter's r columns between them (a mask): no
  gathers, no Python per row or adapter;
- a prefill (many tokens a row), or a step whose rows ask few of them: each adapter's rows through
  its slice alone (a gather each), as computing (and reading) every adapter's columns costs more there.

(PEFT's own ``adapter_names`` indexes each adapter's rows in every layer of every forward in Python
lists, and registers hooks on every module per forward: on SmolLM2 with one adapter, 6.4
questions/s against 9.3 merged; this, 8.0 against 8.8, ``docs/serve.md``.)

Which adapter each row asks is set around each forward (:func:`routing`, by ``inference.decoder``),
as the passages of ``model.prefix_attention`` are. An adapter is read and checked off the decoding
thread (:meth:`AdapterSet.read`: its layers must be the base's, of the same shapes, its prompt
settings the server's, its recorded base weights these), then attached between two batches
(:meth:`AdapterSet.attach`), so a running batch never waits for a disk.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loraqa.config import Config
from loraqa.model.lora import PROMPT_SETTINGS, adapter_settings, recorded_weights
from loraqa.model.weights import check_base_weights

BASE = "__base__"  # a row that asks no adapter
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])\.weight$")


@dataclass
class ReadAdapter:
    """An adapter read from disk and checked, not yet attached: each layer's (A (r, in), B (out, r),
    scale), as saved (scaling and casting are torch work: the decoding thread's, see :meth:`AdapterSet.attach`)."""

    name: str
    path: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]


class Router:
    """The adapter each row of the forward running now asks (None: no forward, or no adapters)."""

    def __init__(self) -> None:
        self.names: list[str | None] | None = None
        self.only: str | None = None  # the one adapter every row asks, where they ask one
        self.mixed = False
        self.asked: set = set()
        self._masks: dict[tuple, torch.Tensor] = {}

    def mask(self, layout: tuple[tuple[str, int, int], ...], device, dtype) -> torch.Tensor:
        """(rows, 1, stacked r) ones where a row's adapter's columns are, for a stack ``layout``
        [(name, start, end)]; made once per forward and layout, shared by the layers that have it."""
        key = (layout, device, dtype)
        if key not in self._masks:
            mask = torch.zeros(len(self.names), 1, layout[-1][2], device=device, dtype=dtype)
            where = {name: (start, end) for name, start, end in layout}
            for row, name in enumerate(self.names):
                if name in where:
                    mask[row, :, where[name][0]:where[name][1]] = 1
            self._masks[key] = mask
        return self._masks[key]

    def rows(self, name: str, device) -> torch.Tensor | None:
        """The rows that ask ``name`` (None: none), made once per forward."""
        key = ("rows", name, device)
        if key not in self._masks:
            picked = [i for i, n in enumerate(self.names) if n == name]
            self._masks[key] = torch.tensor(picked, dtype=torch.long, device=device) if picked else None
        return self._masks[key]

    def set(self, names: list[str | None] | None) -> None:
        self.names, self._masks = names, {}
        self.asked = set(names or ())
        self.mixed = len(self.asked) > 1
        self.only = next(iter(self.asked)) if len(self.asked) == 1 else None


class MultiLoRA(nn.Module):
    """A linear layer (or GPT-2's Conv1D) with several adapters' LoRA over its one weight."""

    def __init__(self, base: nn.Module, router: Router) -> None:
        super().__init__()
        self.base, self.router = base, router
        self.parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (A, scaled B)
        self.layout: tuple[tuple[str, int, int], ...] = ()
        self.a = self.b = None

    def restack(self) -> None:
        """The stacks from ``parts``, in the base weight's dtype and device."""
        weight = self.base.weight
        self.layout, start = (), 0
        for name, (a, _) in self.parts.items():
            self.layout += ((name, start, start + a.shape[0]),)
            start += a.shape[0]
        if self.parts:
            self.a = torch.cat([a for a, _ in self.parts.values()]).to(weight.device, weight.dtype)   # (K r, in)
            self.b = torch.cat([b for _, b in self.parts.values()], 1).to(weight.device, weight.dtype)  # (out, K r)
        else:
            self.a = self.b = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        router = self.router
        if self.a is None or not (router.mixed or router.only):
            return y
        if not router.mixed:  # one adapter for every row: its slice alone
            span = next(((s, e) for n, s, e in self.layout if n == router.only), None)
            if span is not None:
                y.add_((x @ self.a[span[0]:span[1]].T) @ self.b[:, span[0]:span[1]].T)
            return y
        present = [(n, s, e) for n, s, e in self.layout if n in router.asked]
        # a prefill, or a step whose rows ask few of the stacked adapters (reading the whole stack would
        # cost more): each adapter's rows through its slice alone
        if (x.dim() == 3 and x.shape[1] > 1) or 2 * len(present) <= len(self.layout):
            for name, start, end in present:
                rows = router.rows(name, x.device)
                if rows is not None:
                    y.index_add_(0, rows, (x[rows] @ self.a[start:end].T) @ self.b[:, start:end].T)
            return y
        mask = router.mask(self.layout, x.device, x.dtype)  # (rows, 1, K r)
        return y.add_(((x @ self.a.T) * (mask if x.dim() == 3 else mask[:, 0])) @ self.b.T)


@contextmanager
def routing(model, names: list[str | None] | None):
    """Rows ask the adapters ``names`` (one per row: a name, or None / BASE for none) inside the block."""
    router = getattr(_base_of(model), "_loraqa_router", None)
    if router is None or names is None:
        yield
        return
    router.set([None if n == BASE else n for n in names])
    try:
        yield
    finally:
        router.set(None)


def split_adapter_flag(value: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (NAME, PATH); a plain ``PATH`` -> (None, PATH)."""
    name, sep, path = value.partition("=")
    if not sep or "/" in name or not name:
        return None, value
    if not NAME.match(name):
        raise ValueError(f"--adapter {value}: a name is letters, digits, '.', '_' or '-' (at most 64)")
    return name, path


def read_adapter_flags(values: list[str]) -> list[tuple[str | None, str]]:
    """``--adapter`` values as (name or None, path); several need names, one name once."""
    pairs = [split_adapter_flag(v) for v in values]
    if len(pairs) > 1 and any(name is None for name, _ in pairs):
        raise ValueError("several --adapter flags need names: --adapter NAME=PATH for each")
    names = [name for name, _ in pairs if name]
    if len(set(names)) < len(names):
        raise ValueError(f"--adapter: the name {next(n for n in names if names.count(n) > 1)!r} is given twice")
    return pairs


class AdapterSet:
    """The adapters a model serves, by name, and the prompt settings every one must share."""

    def __init__(self, model, config: Config, base_name: str) -> None:
        self.model, self.config, self.base_name = model, config, base_name
        self.router = Router()
        _base_of(model)._loraqa_router = self.router
        self.paths: dict[str, str] = {}
        self.settings: dict | None = None  # the prompt settings all adapters share (the first one's)

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    def read(self, name: str, path: str) -> ReadAdapter:
        """Read and check an adapter (any thread: nothing of the model changes); ``ValueError``, one line."""
        from peft import LoraConfig, PeftConfig
        from peft.utils import load_peft_weights
        from peft.utils.other import get_pattern_key

        where = f"adapter {name!r} ({path})"
        if not NAME.match(name) or name in (BASE, self.base_name):
            raise ValueError(f"{where}: not a usable name (letters, digits, '.', '_', '-'; not the base's)")
        if name in self.paths:
            raise ValueError(f"{where}: an adapter of that name is loaded already; unload it first")
        if not (Path(path) / "adapter_config.json").is_file():
            raise ValueError(f"{where}: no adapter_config.json there (not a PEFT adapter folder)")
        config = PeftConfig.from_pretrained(path)
        if not isinstance(config, LoraConfig) or config.task_type not in (None, "CAUSAL_LM"):
            raise ValueError(f"{where}: not a causal-LM LoRA adapter ({type(config).__name__}, {config.task_type})")
        if getattr(config, "use_dora", False) or config.modules_to_save:
            raise ValueError(f"{where}: it trains more than LoRA matrices (DoRA, or modules in full), which "
                             "cannot share the base with other adapters; merge it and serve it alone")
        settings = {k: v for k, v in adapter_settings(path).items() if k in PROMPT_SETTINGS}
        if self.settings is not None and settings != self.settings:
            differ = sorted(k for k in set(settings) | set(self.settings) if settings.get(k) != self.settings.get(k))
            raise ValueError(f"{where}: trained with other prompt settings ({', '.join(differ)}) than the adapters "
                             "served here; serve it with a server of its own")
        check_base_weights(self.config, path, recorded_weights(path))
        halves: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_peft_weights(path, device="cpu").items():
            match = LORA_KEY.match(key)
            if match is None:
                raise ValueError(f"{where}: it holds {key}, which is not a LoRA matrix; merge it and serve it alone")
            halves.setdefault(match[1], {})[match[2]] = tensor
        modules, layers = dict(_base_of(self.model).named_modules()), {}
        for layer_name, ab in halves.items():
            layer = modules.get(layer_name)
            if isinstance(layer, MultiLoRA):
                layer = layer.base
            if layer is None or not hasattr(layer, "weight") or set(ab) != {"A", "B"}:
                raise ValueError(f"{where}: its layer {layer_name} is not in the base model: made for another one")
            out, inp = _fan(layer)
            if ab["A"].shape[1] != inp or ab["B"].shape[0] != out:
                raise ValueError(f"{where}: its layer {layer_name} is {ab['A'].shape[1]} -> {ab['B'].shape[0]} wide, "
                                 f"the base's {inp} -> {out}: made for another base model")
            r = ab["A"].shape[0]
            alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), layer_name), config.lora_alpha)
            scale = alpha / (math.sqrt(r) if config.use_rslora else r)  # as PEFT's LoraLayer.update_layer
            layers[layer_name] = (ab["A"], ab["B"], scale)
        if not layers:
            raise ValueError(f"{where}: it holds no LoRA matrices")
        return ReadAdapter(name, path, layers)

    def attach(self, adapter: ReadAdapter) -> None:
        """Add a read adapter to the model's layers (between batches: on the decoding thread, where
        all of a server's torch work runs: a second thread's OpenMP threads slowed decoding by 30%
        on 2 cores, docs/serve.md)."""
        base = _base_of(self.model)
        for layer_name, (a, b, scale) in adapter.layers.items():
            ab = (a.float(), b.float() * scale)
            layer = base.get_submodule(layer_name)
            if not isinstance(layer, MultiLoRA):
                parent, _, child = layer_name.rpartition(".")
                layer = MultiLoRA(layer, self.router)
                setattr(base.get_submodule(parent) if parent else base, child, layer)
            layer.parts[adapter.name] = ab
            layer.restack()
        self.paths[adapter.name] = adapter.path
        if self.settings is None:
            self.settings = {k: v for k, v in adapter_settings(adapter.path).items() if k in PROMPT_SETTINGS}

    def detach(self, name: str) -> None:
        """Remove an adapter from the layers (between batches; :meth:`retire` stopped routing to it)."""
        for module in _base_of(self.model).modules():
            if isinstance(module, MultiLoRA) and module.parts.pop(name, None) is not None:
                module.restack()

    def retire(self, name: str) -> None:
        """Stop serving ``name``: no longer listed or routed to, from now on (its layers stay until
        :meth:`detach`, for a batch that may be using it)."""
        del self.paths[name]

    def restack(self) -> None:
        """Every stack again in its layer's dtype (after the base's weights were stored in another)."""
        for module in _base_of(self.model).modules():
            if isinstance(module, MultiLoRA):
                module.restack()

    def describe(self) -> list[dict]:
        """The base and each adapter, for ``GET /v1/models``."""
        return [{"id": self.base_name, "parent": None}] + [{"id": n, "parent": self.base_name, "path": p}
                                                          for n, p in self.paths.items()]


def _base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _fan(layer) -> tuple[int, int]:
    """(outputs, inputs) of a linear layer; GPT-2's Conv1D stores its weight (in, out)."""
    from transformers.pytorch_utils import Conv1D

    rows, cols = layer.weight.shape
    return (cols, rows) if isinstance(layer, Conv1D) else (rows, cols)
