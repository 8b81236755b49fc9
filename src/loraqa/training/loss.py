"""The answer-only loss: what training minimises, the epoch-end eval loss, and a timed probe step.

The loss is a sum over answer tokens (the labels that are not ``IGNORE_INDEX``), so micro-batches
and processes add up to the whole batch's; callers divide by the global count.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F

from loraqa import IGNORE_INDEX
from loraqa.data.batching import micro_batches
from loraqa.data.features import Feature, collate_train, median_batch
from loraqa.model.load import base_model
from loraqa.model.precision import autocast
from loraqa.model.prefix import continue_from_prefix
from loraqa.model.span import SpanFeature, collate_span, span_loss_sum, span_windows
from loraqa.training.processes import Processes

def answer_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over label positions (``model(**batch).loss`` x their count).

    Only positions whose next token is a label in some row go through the LM head (the model's own
    ``logits_to_keep``, so whatever the model does to its logits, soft-capping or scaling, is done):
    the prompt's logits (most of each sequence, and a vocab-sized matmul per token) are never needed. A batch from
    :func:`loraqa.data.batching.collate_context_train` runs its shared prefixes first and each row's
    remainder on top of their keys and values (gradients flow back through both). A span batch
    (``--method span``) gives its start/end loss summed over windows instead.
    """
    if "start_positions" in batch:
        return span_loss_sum(model, batch)
    lm = base_model(model)
    labels = batch["labels"][:, 1:]          # position t predicts token t + 1
    keep = labels != IGNORE_INDEX            # (B, T - 1)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "prefix_ids" in batch:
        inputs = continue_from_prefix(lm, batch)
    if "logits_to_keep" in inspect.signature(type(lm).forward).parameters:
        positions = keep.any(0).nonzero().squeeze(-1)  # (K,): where some row's next token is a label
        logits = lm(**inputs, use_cache="prefix_ids" in batch, logits_to_keep=positions).logits  # (B, K, V)
        keep, labels = keep[:, positions], labels[:, positions]
    else:
        logits = lm(**inputs, use_cache="prefix_ids" in batch).logits[:, :-1]  # (B, T - 1, V)
    return F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")  # (N, V), N = answer tokens


class AnswerLoss(torch.nn.Module):
    """The loss as a module, so DDP sees a forward call and syncs gradients in backward."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        return answer_loss_sum(self.model, batch) * scale


def answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    """What the loss is a sum over: answer tokens, or a span batch's labelled windows."""
    if "start_positions" in batch:
        return span_windows(batch)
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def collate_for(features: list) -> Callable:
    return collate_span if features and isinstance(features[0], SpanFeature) else collate_train


@torch.no_grad()
def evaluate_loss(model, features: list[Feature], batch_size: int, pad_id: int, device: torch.device,
                  precision: str, processes: Processes | None = None, max_batch_tokens: int | None = None) -> float:
    """Token-weighted mean answer loss over ``features``, each process taking a share; with
    ``max_batch_tokens``, no forward pass runs over more padded tokens than training's."""
    processes = processes or Processes.single()
    model.eval()
    order = sorted(features, key=lambda f: len(f.input_ids))[processes.rank::processes.world]
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, answer tokens)
    for b in range(0, len(order), batch_size):
        for part in micro_batches(order[b:b + batch_size], collate_for(order), pad_id, max_batch_tokens):
            batch = {k: v.to(device) for k, v in part.items()}
            with autocast(device, precision):
                total[0] += answer_loss_sum(model, batch).detach()  # on the device: no sync a batch
            total[1] += answer_tokens(batch)
    total = processes.sum(total)
    return float(total[0] / max(total[1], 1))


def train_step_probe(model, features: list[Feature], batch_size: int, pad_id: int, device: torch.device):
    """One training step's forward and backward at the run's shapes (``batch_size`` examples of
    median length), for timing precisions; gradients are dropped after each call."""
    batch = {k: v.to(device) for k, v in median_batch(features, batch_size, pad_id, collate_for(features)).items()}

    def step(precision: str) -> None:
        model.train()
        with autocast(device, precision):
            loss = answer_loss_sum(model, batch) / max(answer_tokens(batch), 1)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step
