"""Gradient checkpointing (``--gradient-checkpointing``) that keeps passage batches' KV cache and
does not redraw LoRA's dropout masks.

transformers checkpoints each decoder layer (non-reentrant, so PEFT's frozen inputs need no
``requires_grad``); the recomputation replays each layer's forward in the backward pass. Two things
make that replay cheaper or possible here:

* Passage batches pass a passage's keys and values to its questions through a cache, which
  transformers turns off under checkpointing (its caches append on every call). Their cache
  (``train.SharedPrefixCache``) gives the same states however often a layer is recomputed, so the
  cache stays on; the model-level flag that would drop it (GPT-2's) is turned off.
* With a frozen base, the backward pass is about as cheap as the forward, so the replay is a large
  share of a step, and on a CPU drawing LoRA's dropout masks was a third of the forward (torch's
  ``bernoulli_`` is slow there: a profile on SmolLM2-135M put it at 17% of a whole step). Each LoRA
  dropout here draws its mask exactly as ``torch.nn.functional.dropout`` does (the same random
  numbers, so the same masks as a run without checkpointing), keeps it as bits (1/32 of the float
  mask), and the replay reuses the bits instead of drawing again: PyTorch's selective checkpointing
  (``create_selective_checkpoint_contexts``) saves the output of the op that draws them.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

_SHIFTS = {}


def _shifts(device: torch.device) -> torch.Tensor:
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return _SHIFTS[device]


@torch.library.custom_op("loraqa::dropout_keep_bits", mutates_args=())
def dropout_keep_bits(x: torch.Tensor, p: float) -> torch.Tensor:
    """The keep mask ``F.dropout(x, p)`` would draw (same generator calls), packed 8 per byte."""
    keep = torch.empty_like(x).bernoulli_(1 - p).reshape(-1).bool()
    pad = -keep.numel() % 8
    if pad:
        keep = torch.cat([keep, keep.new_zeros(pad)])
    return (keep.view(-1, 8).to(torch.uint8) << _shifts(x.device)).sum(-1, dtype=torch.uint8)


@dropout_keep_bits.register_fake
def _(x: torch.Tensor, p: float) -> torch.Tensor:
    return x.new_empty((x.numel() + 7) // 8, dtype=torch.uint8)


def unpack_keep(bits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The bool mask of ``like``'s shape from :func:`dropout_keep_bits`'s bytes."""
    keep = ((bits[:, None] >> _shifts(bits.device)) & 1).reshape(-1)[:like.numel()]
    return keep.view(like.shape)


class ReplayedDropout(nn.Module):
    """``nn.Dropout(p)`` with the same masks, drawn once per step and replayed from bits."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        noise = unpack_keep(torch.ops.loraqa.dropout_keep_bits(x, self.p), x).to(x.dtype).div_(1 - self.p)
        return x * noise  # F.dropout's own arithmetic: the same values to the bit

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _keep_mask_bits(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    if op is torch.ops.loraqa.dropout_keep_bits.default:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_keep_mask_bits)


def enable_gradient_checkpointing(model) -> int:
    """Recompute each decoder layer in the backward pass, keeping the prefix cache and the dropout
    masks (see the module's docstring); returns how many LoRA dropouts now replay their masks."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers then says it sets use_cache=False; the layers still use the cache they are given
    logging.getLogger("transformers.modeling_layers").addFilter(
        lambda record: "Caching is incompatible with gradient checkpointing" not in record.getMessage())
    kwargs = {"use_reentrant": False, "context_fn": _context}
    if hasattr(lm, "activation_checkpointing_enable"):  # its name since transformers 5.x
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for module in lm.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True
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

