"""Several LoRA adapters on one base model, for a server: each checked against the base, loaded at the
start or while serving, and answered together, rows of different adapters in one batch.

PEFT reads an adapter (its config and weights, ``load_peft_weights``) and says each layer's scale
(``rank_pattern``, ``alpha_pattern``, rsLoRA); the layers it targets are wrapped in a
``model.multilora.MultiLoRA``, which computes each row's own adapter (PEFT's own ``adapter_names``
indexes each adapter's rows in every layer of every forward in Python lists, and registers hooks on
every module per forward: on SmolLM2 with one adapter, 6.4 questions/s against 9.3 merged; this, 8.0
against 8.8, ``docs/serve.md``).

An adapter is read and checked off the decoding thread (:meth:`AdapterSet.read`: its layers must be
the base's, of the same shapes, its prompt settings the server's, its recorded base weights these),
then attached between two batches (:meth:`AdapterSet.attach`) under a new *handle*, so a running
batch never waits for a disk and a request is answered by the load it was admitted with.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import torch

from loraqa.config import Config
from loraqa.io import log
from loraqa.model.load import base_model
from loraqa.model.lora import adapter_settings, recorded_weights
from loraqa.model.multilora import BASE, MultiLoRA, Router, UnroutableMix, routing
from loraqa.model.weights import check_base_weights

# the prompt settings that give an answer its meaning: an adapter answers only in those it was trained on
COMPARED = ("template", "no_answer_text", "method")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])\.weight$")


@dataclass
class ReadAdapter:
    """An adapter read from disk and checked, not yet attached: each layer's (A (r, in), B (out, r),
    scale), as saved (scaling and casting are torch work: the decoding thread's, see :meth:`AdapterSet.attach`)."""

    name: str
    path: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]


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


def prompt_mismatch(settings: dict, adapter: str) -> str | None:
    """Which of an adapter's saved prompt settings differ from ``settings`` (what a server answers
    with), in one phrase, or None. The window's length is not among them: a passage is read in the
    server's windows whatever the adapter was trained on."""
    saved = adapter_settings(adapter)
    differ = [k for k in COMPARED if k in saved and k in settings and saved[k] != settings[k]]
    if not differ:
        return None
    return "; ".join(f"{k} {saved[k]!r}, served with {settings[k]!r}" for k in differ)


@dataclass(frozen=True)
class Served:
    """An adapter being served: its handle (``NAME#N``, new at each load, so a request admitted for
    one load is never answered by another of the same name) and its folder."""

    handle: str
    path: str


class AdapterSet:
    """The adapters a model serves, by name, each answered in the prompt settings the server uses."""

    def __init__(self, model, config: Config, base_name: str) -> None:
        self.model, self.config, self.base_name = model, config, base_name
        self.router = Router()
        lm = base_model(model)
        lm._loraqa_router = self.router
        lm.register_forward_pre_hook(self.router.heard, with_kwargs=True)
        # replaced whole on each load and unload, never changed in place: a reader's copy stays whole
        self.served: dict[str, Served] = {}
        self.loads = count(1)
        self.mixable, self.why_not_mixable = True, ""

    @property
    def names(self) -> list[str]:
        return list(self.served)

    def handle(self, name: str) -> str:
        """The handle of the adapter served as ``name`` now (``KeyError`` for none)."""
        return self.served[name].handle

    def holds(self, handle: str) -> bool:
        """Whether ``handle``'s matrices are in the layers (on the decoding thread: between batches)."""
        return any(handle in m.parts for m in self._layers())

    def read(self, name: str, path: str) -> ReadAdapter:
        """Read and check an adapter (any thread: nothing of the model changes); ``ValueError``, one line."""
        from peft import LoraConfig, PeftConfig
        from peft.utils import load_peft_weights
        from peft.utils.other import get_pattern_key

        where = f"adapter {name!r} ({path})"
        if not NAME.match(name) or name in (BASE, self.base_name):
            raise ValueError(f"{where}: not a usable name (letters, digits, '.', '_', '-'; not the base's)")
        if name in self.served:
            raise ValueError(f"{where}: an adapter of that name is loaded already; unload it first")
        if not (Path(path) / "adapter_config.json").is_file():
            raise ValueError(f"{where}: no adapter_config.json there (not a PEFT adapter folder)")
        config = PeftConfig.from_pretrained(path)
        if not isinstance(config, LoraConfig) or config.task_type not in (None, "CAUSAL_LM"):
            raise ValueError(f"{where}: not a causal-LM LoRA adapter ({type(config).__name__}, {config.task_type})")
        if getattr(config, "target_parameters", None):  # PEFT's all-linear on fused experts' weights
            raise ValueError(f"{where}: it adapts parameters, not linear layers (target_parameters "
                             f"{sorted(config.target_parameters)}), which cannot share the base with other adapters; "
                             "merge it and serve it alone")
        if getattr(config, "use_dora", False) or config.modules_to_save:
            raise ValueError(f"{where}: it trains more than LoRA matrices (DoRA, or modules in full), which "
                             "cannot share the base with other adapters; merge it and serve it alone")
        differ = prompt_mismatch({k: getattr(self.config, k) for k in COMPARED}, path)
        if differ:
            raise ValueError(f"{where}: trained with other prompt settings than this server answers with ({differ}); "
                             "serve it with a server of its own")
        check_base_weights(self.config, path, recorded_weights(path))
        halves: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_peft_weights(path, device="cpu").items():
            match = LORA_KEY.match(key)
            if match is None:
                raise ValueError(f"{where}: it holds {key}, which is not a LoRA matrix; merge it and serve it alone")
            halves.setdefault(match[1], {})[match[2]] = tensor
        modules, layers = dict(base_model(self.model).named_modules()), {}
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

    def attach(self, adapter: ReadAdapter) -> str:
        """Add a read adapter to the model's layers, under a new handle (returned), and serve it
        (between batches: on the decoding thread, where all of a server's torch work runs: a second
        thread's OpenMP threads slowed decoding by 30% on 2 cores, docs/serve.md)."""
        base = base_model(self.model)
        handle = f"{adapter.name}#{next(self.loads)}"
        for layer_name, (a, b, scale) in adapter.layers.items():
            ab = (a.float(), b.float() * scale)
            layer = base.get_submodule(layer_name)
            if not isinstance(layer, MultiLoRA):
                parent, _, child = layer_name.rpartition(".")
                layer = MultiLoRA(layer, self.router)
                setattr(base.get_submodule(parent) if parent else base, child, layer)
            layer.parts[handle] = ab
            layer.restack()
        if self.mixable:
            self._check_mixing(handle)
        self.served = {**self.served, adapter.name: Served(handle, adapter.path)}
        return handle

    def _check_mixing(self, handle: str) -> None:
        """Whether rows of the base and of ``handle`` can share a forward: every adapted layer must
        see its tokens by row (``Router.per_row``). A model where one does not decodes one adapter's
        rows a batch (said once in the log)."""
        lm = base_model(self.model)
        device = next(lm.parameters()).device
        ids = torch.ones(2, 3, dtype=torch.long, device=device)
        try:
            with torch.inference_mode(), routing(self.model, [BASE, handle]):
                lm(input_ids=ids, use_cache=False)
        except UnroutableMix as e:
            self.mixable, self.why_not_mixable = False, str(e)
            log(f"adapters of {self.base_name} are decoded one adapter a batch: {e}")

    def retire(self, name: str) -> str:
        """Stop serving ``name`` (no longer listed, nor given to new requests) and return its handle;
        its matrices stay until :meth:`detach`, for a batch that may be using them."""
        handle = self.served[name].handle
        self.served = {n: s for n, s in self.served.items() if n != name}
        return handle

    def detach(self, handle: str) -> None:
        """Remove an adapter's matrices from the layers (between batches, after :meth:`retire`)."""
        for module in self._layers():
            if module.parts.pop(handle, None) is not None:
                module.restack()

    def describe(self) -> list[dict]:
        """The base and each adapter, for ``GET /v1/models`` (no path: the server's disk is its own)."""
        served = self.served
        return [{"id": self.base_name, "parent": None}] + [{"id": n, "parent": self.base_name} for n in served]

    def _layers(self) -> list[MultiLoRA]:
        return [m for m in base_model(self.model).modules() if isinstance(m, MultiLoRA)]


def display_name(handle: str) -> str:
    """The name a handle was served as (``NAME#N`` -> ``NAME``)."""
    return handle.partition("#")[0]


def _fan(layer) -> tuple[int, int]:
    """(outputs, inputs) of a linear layer; GPT-2's Conv1D stores its weight (in, out)."""
    from transformers.pytorch_utils import Conv1D

    rows, cols = layer.weight.shape
    return (cols, rows) if isinstance(layer, Conv1D) else (rows, cols)
