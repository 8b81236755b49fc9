"""One optimizer step's pieces: which examples each step takes, this process's share as
micro-batches, the forward and backward that make N processes compute one process's update, and
the update itself.

Every process takes its share of each global batch; DDP (through Accelerate) averages gradients,
and the loss is scaled by the *global* answer-token count, so N processes compute the same update
as one process with the same global batch (to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraqa import IGNORE_INDEX
from loraqa.config import Config
from loraqa.data.batching import (collate_context_train, context_batches, context_groups, length_grouped_batches,
                                  micro_batches, padded_tokens)
from loraqa.data.features import Feature
from loraqa.model.precision import autocast
from loraqa.training.loss import answer_tokens, collate_for
from loraqa.training.processes import Processes


class StepPlan:
    """Which examples each optimizer step of an epoch takes, and this process's micro-batches of them.

    With ``group_by_passage`` a passage's questions share a batch (and its prefill); otherwise
    batches are length-grouped. ``seed + epoch`` fixes each epoch's order.
    """

    def __init__(self, features: list[Feature], config: Config, pad_id: int, processes: Processes,
                 passages_apart: bool = True) -> None:
        self.features, self.config, self.pad_id, self.processes = features, config, pad_id, processes
        # passages_apart: whether the model computes the same with a passage run apart (model.support)
        self.by_passage = config.group_by_passage and config.method != "span" and passages_apart
        if self.by_passage:
            self.groups, self.collate = context_groups(features), collate_context_train
        else:
            self.lengths, self.collate = [len(f.input_ids) for f in features], collate_for(features)

    def epoch(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches, as indices into the features."""
        if self.by_passage:
            return context_batches(self.groups, self.config.batch_size, self.config.seed + epoch)
        return length_grouped_batches(self.lengths, self.config.batch_size, self.config.seed + epoch)

    def micro_batches(self, indices: list[int]) -> list[dict]:
        """This process's share of a global batch, collated as micro-batches (``max_batch_tokens``)."""
        mine = _share(self.features, indices, self.processes, self.config.group_by_passage)
        return micro_batches(mine, self.collate, self.pad_id, self.config.max_batch_tokens)

    def parts(self, indices: list[int], device: torch.device) -> list[dict]:
        """The micro-batches on ``device``; under DDP every process runs as many backward passes."""
        parts = [{k: v.to(device) for k, v in part.items()} for part in self.micro_batches(indices)]
        if self.config.max_batch_tokens:
            parts += [_no_labels(parts[0])] * (self.processes.max(len(parts)) - len(parts))
        return parts

    def largest_batch_tokens(self, epoch: int) -> int:
        return max(padded_tokens(p) for indices in self.epoch(epoch) for p in self.micro_batches(indices))


@dataclass
class StepResult:
    loss: float          # the global batch's token-mean answer loss
    answer_tokens: int   # over all processes
    real_tokens: int     # tokens the model ran, over all processes (shared prefixes once)
    stop: bool           # some process got Ctrl-C
    largest: int         # this process's largest micro-batch, padded tokens


def forward_backward(loss_module, parts: list[dict], scaler, processes: Processes, device: torch.device,
                     precision: str, stop_requested: bool) -> StepResult:
    """Forward and backward over a step's micro-batches: their gradients add up to the whole
    global batch's. One collective first: global answer tokens, real tokens, and any Ctrl-C; on a
    Ctrl-C anywhere, nothing is computed (``stop`` set, no loss)."""
    counts = processes.sum(torch.tensor([sum(answer_tokens(p) for p in parts), sum(_computed_tokens(p) for p in parts),
                                         int(stop_requested)], dtype=torch.float64, device=device))
    n_global = int(counts[0])
    if counts[2] > 0:
        return StepResult(float("nan"), 0, 0, True, 0)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    for part in parts:
        with autocast(device, precision):
            # DDP averages gradients over processes: scale by world / global tokens so the update is
            # the gradient of the global token-mean loss
            part_loss = loss_module(part, scale=processes.world / max(n_global, 1))
        scaler.scale(part_loss).backward()
        loss += part_loss.detach()
    batch_loss = float(processes.sum(loss.detach().double())) / processes.world  # global token mean
    return StepResult(batch_loss, n_global, int(counts[1]), bool(counts[2] > 0), max(padded_tokens(p) for p in parts))


def apply_update(params: list, optimizer, scheduler, scaler, max_grad_norm: float) -> None:
    """Clip (``max_grad_norm`` > 0), step the optimizer and the schedule, clear the gradients."""
    if max_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _share(features: list[Feature], indices: list[int], processes: Processes, contiguous: bool) -> list[Feature]:
    """This process's part of a global batch: contiguous keeps passages together, strided spreads
    lengths evenly. A process left without examples (a short last batch) runs one with no labels,
    so every process still takes part in the step; it adds nothing to the loss or the gradient."""
    size = -(-len(indices) // processes.world)
    mine = (indices[processes.rank * size:(processes.rank + 1) * size] if contiguous
            else indices[processes.rank::processes.world])
    if not mine:
        f = features[indices[0]]
        return [Feature(f.id, f.input_ids, n_prompt=len(f.input_ids))]
    return [features[i] for i in mine]


def _computed_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (not padding) tokens the model runs: shared prefixes count once."""
    return int(batch["attention_mask"].sum()) + (int(batch["prefix_mask"].sum()) if "prefix_mask" in batch else 0)


def _no_labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` with no label: a backward pass that adds nothing (for a process with fewer micro-batches)."""
    keys = ("start_positions", "end_positions") if "start_positions" in batch else ("labels",)
    return {**batch, **{k: torch.full_like(batch[k], IGNORE_INDEX) for k in keys}}
