"""Gradient checkpointing (``--gradient-checkpointing``) that keeps passage batches' KV cache and
does not redraw LoRA's dropout masks.

transformers checkpoints each decoder layer (non-reentrant); the backward pass replays each layer's
forward. Two things make that replay possible or cheaper here:

* passage batches hand a passage's keys and values to its questions through a cache, which
  transformers turns off under checkpointing; ``model.prefix.SharedPrefixCache`` gives the same
  states however often a layer is recomputed, so the cache stays on;
* each LoRA dropout draws its mask as ``torch.nn.functional.dropout`` does (the same masks as a run
  without checkpointing), keeps it as bits on a tape that belongs to that layer call, and the
  replay reads the tape instead of drawing again (drawing masks is slow on a CPU).

Why, and what was measured: docs/design-notes.md.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

import torch
from torch import nn

from loraqa.model.load import base_model

_SHIFTS: dict[torch.device, torch.Tensor] = {}
_TAPES = threading.local()  # the tape of the layer call running in this thread, if any


def _shifts(device: torch.device) -> torch.Tensor:
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A mask (any dtype, 0 or not) as bits, 8 per byte."""
    keep = mask.reshape(-1).bool()
    pad = -keep.numel() % 8
    if pad:
        keep = torch.cat([keep, keep.new_zeros(pad)])
    return (keep.view(-1, 8).to(torch.uint8) << _shifts(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The 0/1 mask of ``like``'s shape and dtype from :func:`pack_bits`'s bytes."""
    keep = ((bits[:, None] >> _shifts(bits.device)) & 1).reshape(-1)[:like.numel()]
    return keep.view(like.shape).to(like.dtype)


class MaskTape:
    """The dropout masks one checkpointed layer call drew, in order: recorded by the first run of
    the layer, replayed by its recomputation."""

    def __init__(self) -> None:
        self.masks: list[torch.Tensor] = []
        self.recorded = False
        self.cursor = 0

    @contextmanager
    def running(self):
        self.cursor = 0
        stack = _TAPES.__dict__.setdefault("stack", [])
        stack.append(self)
        try:
            yield
        finally:
            stack.pop()
            self.recorded = True


def _current_tape() -> MaskTape | None:
    stack = getattr(_TAPES, "stack", None)
    return stack[-1] if stack else None


def taped(checkpoint_func):
    """``checkpoint_func`` (transformers' call of ``torch.utils.checkpoint``) with a fresh tape per
    layer call, so the layer's recomputation replays the masks its first run drew."""

    def run(function, *args, **kwargs):
        tape = MaskTape()

        def recorded(*inner_args, **inner_kwargs):
            with tape.running():
                return function(*inner_args, **inner_kwargs)

        return checkpoint_func(recorded, *args, **kwargs)

    return run


class ReplayedDropout(nn.Module):
    """``nn.Dropout(p)``, drawing the same masks with the same arithmetic as torch's dropout on a
    CPU (``bernoulli_(1 - p)``, divided by ``1 - p``, times the input); inside a checkpointed layer
    it keeps each mask as bits and the recomputation replays them instead of drawing again."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        tape = _current_tape()
        if tape is not None and tape.recorded:
            noise = unpack_bits(tape.masks[tape.cursor], x)
            tape.cursor += 1
        else:
            noise = torch.empty_like(x).bernoulli_(1 - self.p)
            if tape is not None:
                tape.masks.append(pack_bits(noise))
        return x * noise.div_(1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def enable_gradient_checkpointing(model) -> int:
    """Recompute each decoder layer in the backward pass, keeping the prefix cache and the dropout
    masks (see the module's docstring); returns how many LoRA dropouts now replay their masks."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    lm = base_model(model)
    # transformers then says it sets use_cache=False; the layers still use the cache they are given
    logging.getLogger("transformers.modeling_layers").addFilter(
        lambda record: "Caching is incompatible with gradient checkpointing" not in record.getMessage())
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # its name since transformers 5.x
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for module in lm.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True
            module._gradient_checkpointing_func = taped(module._gradient_checkpointing_func)
        elif getattr(module, "gradient_checkpointing", False):
            module.gradient_checkpointing = False
    replayed = 0
    for module in model.modules():  # PEFT keeps each adapter's dropout in a ModuleDict
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for name, dropout in dropouts.items():
                if isinstance(dropout, nn.Dropout) and dropout.p > 0:
                    dropouts[name] = ReplayedDropout(dropout.p)
                    replayed += 1
    return replayed

