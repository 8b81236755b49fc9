"""The training loop: answer-only loss, AdamW, warmup + linear decay, clipping, eval loss per epoch.

One process or several (``torchrun`` / ``accelerate launch``): every process takes its share of each
global batch, gradients are averaged by DDP (through Accelerate), and the loss is scaled by the
*global* answer-token count, so N processes compute the same update as one process with the same
global batch (to float rounding).
"""

from __future__ import annotations

import copy
import math
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from loraqa import IGNORE_INDEX
from loraqa.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from loraqa.config import Config
from loraqa.distributed import Processes
from loraqa.batching import (collate_context_train, context_batches, context_groups, length_grouped_batches,
                             micro_batches, padded_tokens)
from loraqa.features import Feature, collate_train, median_batch
from loraqa.model import cache_kwarg
from loraqa.precision import autocast
from loraqa.span import SpanFeature, collate_span, span_loss_sum, span_windows

LOG_STEPS = 10  # optimizer steps per point of the loss curve (steps.jsonl)

# Models whose logits are post-processed after the LM head; they take the plain (full-head) path.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def answer_loss_sum(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over label positions (``model(**batch).loss`` x their count).

    Only positions whose next token is a label go through the LM head: the prompt's logits
    (most of each sequence, and a vocab-sized matmul per token) are never needed. A batch from
    :func:`loraqa.batching.collate_context_train` runs its shared prefixes first and each row's
    remainder on top of their keys and values (gradients flow back through both). A span batch
    (``--method span``) gives its start/end loss summed over windows instead.
    """
    if "start_positions" in batch:
        return span_loss_sum(model, batch)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    labels = batch["labels"][:, 1:]          # position t predicts token t + 1
    keep = labels != IGNORE_INDEX            # (B, T - 1)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "prefix_ids" in batch:
        inputs = _after_prefix(lm, batch)
    if any(getattr(lm.config, k, None) for k in _LOGIT_POSTPROCESSING):
        return model(**inputs, labels=batch["labels"]).loss * keep.sum()
    hidden = lm.get_decoder()(**inputs, use_cache="prefix_ids" in batch).last_hidden_state  # (B, T, H)
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V), N = answer tokens
    return F.cross_entropy(logits.float(), labels[keep], reduction="sum")


def _after_prefix(lm, batch: dict[str, torch.Tensor]) -> dict:
    """Run the shared prefixes; the inputs that continue each row from its group's prefix."""
    decoder = lm.get_decoder()
    name, prefix_cache = cache_kwarg(decoder), SharedPrefixCache(config=lm.config)
    prefix_mask, row_prefix = batch["prefix_mask"], batch["row_prefix"]
    decoder(input_ids=batch["prefix_ids"], attention_mask=prefix_mask,
            position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True, **{name: prefix_cache})
    cache = {name: prefix_cache.spread(row_prefix)}  # (G, ...) -> (B, ...): index_select, differentiable
    past_mask = prefix_mask[row_prefix]
    mask = batch["attention_mask"]
    # real tokens count 0, 1, ... across prefix and remainder (the remainder is right-padded)
    position_ids = past_mask.sum(-1, keepdim=True) + (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": batch["input_ids"], "attention_mask": torch.cat([past_mask, mask], dim=1),
            "position_ids": position_ids, **cache}


class SharedPrefixCache(DynamicCache):
    """A cache whose ``update`` does the same thing every time it is called with the same input, so
    gradient checkpointing may recompute any layer and see what the first pass saw: the prefix's
    cache stores each layer's keys and values (replacing, not appending); the rows' cache, made by
    :meth:`spread`, returns the prefix's followed by the new ones without storing them."""

    reading = False

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        if self.reading:
            return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        layer.keys, layer.values = key_states, value_states
        return key_states, value_states

    def spread(self, row_prefix: torch.Tensor) -> SharedPrefixCache:
        """A read-only cache for the rows: row i holds group ``row_prefix[i]``'s prefix. A new object,
        as the prefix's layers may be recomputed (and call ``update`` here) after the rows' are."""
        rows = copy.copy(self)
        rows.layers = [copy.copy(layer) for layer in self.layers]
        for layer in rows.layers:
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys[row_prefix], layer.values[row_prefix]
        rows.reading = True
        return rows


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean answer-token cross-entropy, equal to ``model(**batch).loss``."""
    return answer_loss_sum(model, batch) / _answer_tokens(batch)


class AnswerLoss(torch.nn.Module):
    """The loss as a module, so DDP sees a forward call and syncs gradients in backward."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        return answer_loss_sum(self.model, batch) * scale


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
    return int(batch["attention_mask"].sum()) + int(batch.get("prefix_mask", torch.zeros(0)).sum())


def _no_labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` with no label: a backward pass that adds nothing (for a process with fewer micro-batches)."""
    keys = ("start_positions", "end_positions") if "start_positions" in batch else ("labels",)
    return {**batch, **{k: torch.full_like(batch[k], IGNORE_INDEX) for k in keys}}


def _answer_tokens(batch: dict[str, torch.Tensor]) -> int:
    """What the loss is a sum over: answer tokens, or a span batch's labelled windows."""
    if "start_positions" in batch:
        return span_windows(batch)
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _collate_for(features: list) -> Callable:
    return collate_span if features and isinstance(features[0], SpanFeature) else collate_train


@torch.no_grad()
def evaluate_loss(model, features: list[Feature], batch_size: int, pad_id: int, device: torch.device,
                  precision: str, processes: Processes | None = None, max_batch_tokens: int | None = None) -> float:
    """Token-weighted mean answer loss over ``features``, each process taking a share; with
    ``max_batch_tokens``, no forward pass runs over more padded tokens than training's."""
    processes = processes or Processes.single()
    model.eval()
    order = sorted(features, key=lambda f: len(f.input_ids))[processes.rank::processes.world]
    total = torch.zeros(2, dtype=torch.float64)  # (loss sum, answer tokens)
    for b in range(0, len(order), batch_size):
        for part in micro_batches(order[b:b + batch_size], _collate_for(order), pad_id, max_batch_tokens):
            batch = {k: v.to(device) for k, v in part.items()}
            with autocast(device, precision):
                total[0] += answer_loss_sum(model, batch).item()
            total[1] += _answer_tokens(batch)
    total = processes.sum(total)
    return float(total[0] / max(total[1], 1))


def probe_step(model, features: list[Feature], batch_size: int, pad_id: int, device: torch.device):
    """One training step's forward and backward at the run's shapes (``batch_size`` examples of
    median length), for timing precisions; gradients are dropped after each call."""
    batch = {k: v.to(device) for k, v in median_batch(features, batch_size, pad_id, _collate_for(features)).items()}

    def step(precision: str) -> None:
        model.train()
        with autocast(device, precision):
            loss = answer_loss_sum(model, batch) / max(_answer_tokens(batch), 1)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


class _StopRequest:
    """Ctrl-C sets a flag; the loop saves a checkpoint at the next step boundary, then stops."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self):
        self._previous = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)


def train(model, train_features: list[Feature], eval_features: list[Feature], config: Config, *,
          pad_id: int, device: torch.device, precision: str, processes: Processes | None = None,
          on_epoch_end: Callable[[list[dict], list[dict]], None] = lambda history, steps: None,
          on_step_point: Callable[[dict], None] = lambda point: None, progress: bool = True,
          checkpoint_dir: Path | None = None) -> tuple[list[dict], list[dict]]:
    """Train in place with ``config``'s settings; returns (history, steps): one row per epoch, and
    the loss curve, one point per ``LOG_STEPS`` optimizer steps (each also passed to ``on_step_point``).

    With ``checkpoint_dir``, a checkpoint is saved every ``config.save_steps`` optimizer steps (0:
    never mid-epoch), at every epoch end, and on Ctrl-C; a later call with the same arguments
    resumes from the newest one and ends with the same weights as an uninterrupted run.
    """
    from transformers import get_linear_schedule_with_warmup

    processes = processes or Processes.single()
    if config.batch_size % processes.world:
        raise ValueError(f"--batch-size {config.batch_size} must be a multiple of the {processes.world} processes")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.epochs * math.ceil(len(train_features) / config.batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(config.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_module = processes.wrap(AnswerLoss(model))
    if config.group_by_passage and config.method != "span":  # a passage's questions share a batch and its prefill
        groups = context_groups(train_features)
        plan, collate = (lambda epoch: context_batches(groups, config.batch_size, config.seed + epoch)), collate_context_train
    else:
        lengths = [len(f.input_ids) for f in train_features]
        plan, collate = (lambda epoch: length_grouped_batches(lengths, config.batch_size, config.seed + epoch)), \
            _collate_for(train_features)
    # everything that a resumed run needs besides weights, optimizer, scheduler and RNG
    state = {"epoch": 1, "batch": 0, "step": 0, "loss_sum": 0.0, "loss_tokens": 0, "real_tokens": 0,
             "seconds": 0.0, "history": [], "steps": [], "window": [0.0, 0], "precision": precision}
    saved = list_checkpoints(checkpoint_dir) if checkpoint_dir else []
    if saved:
        state = load_checkpoint(saved[-1], model, optimizer, scheduler, scaler, processes.rank)
        processes.log(f"resuming from {saved[-1]} (epoch {state['epoch']}, step {state['step']})")

    def step_batches(indices: list[int]) -> list[dict]:
        mine = _share(train_features, indices, processes, config.group_by_passage)
        return micro_batches(mine, collate, pad_id, config.max_batch_tokens)

    largest = max(padded_tokens(p) for indices in plan(state["epoch"]) for p in step_batches(indices))
    processes.log(f"largest batch this epoch: {largest:,} tokens with padding"
                  + (f" (micro-batches of at most {config.max_batch_tokens:,})" if config.max_batch_tokens else "")
                  + (", gradient checkpointing on" if config.gradient_checkpointing else ""))

    def save() -> None:
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, state["step"], model, optimizer, scheduler, scaler, state,
                            config.keep_checkpoints, processes)

    with _StopRequest() as stop:
        for epoch in range(state["epoch"], config.epochs + 1):
            model.train()
            batches = plan(epoch)
            bar = tqdm(total=len(batches), initial=state["batch"], desc=f"epoch {epoch}/{config.epochs}",
                       unit="step", disable=not (progress and processes.is_main))
            start = time.perf_counter() - state["seconds"]
            for indices in batches[state["batch"]:]:
                parts = [{k: v.to(device) for k, v in part.items()} for part in step_batches(indices)]
                if config.max_batch_tokens:  # DDP: every process runs as many backward passes
                    parts += [_no_labels(parts[0])] * (processes.max(len(parts)) - len(parts))
                # one collective per step: global answer tokens, real tokens, and whether anyone got Ctrl-C
                counts = processes.sum(torch.tensor([sum(_answer_tokens(p) for p in parts),
                                                     sum(_computed_tokens(p) for p in parts),
                                                     int(stop.requested)], dtype=torch.float64))
                n_global = int(counts[0])
                loss = torch.zeros((), dtype=torch.float64, device=device)
                for part in parts:  # micro-batches: gradients add up to the whole batch's
                    with autocast(device, precision):
                        # DDP averages gradients over processes: scale by world / global tokens so the
                        # update is the gradient of the global token-mean loss
                        part_loss = loss_module(part, scale=processes.world / max(n_global, 1))
                    scaler.scale(part_loss).backward()
                    loss += part_loss.detach()
                    state["largest_batch_tokens"] = max(state.get("largest_batch_tokens", 0), padded_tokens(part))
                if config.max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                batch_loss = float(processes.sum(loss.detach().double())) / processes.world  # global token mean
                state["loss_sum"] += batch_loss * n_global
                state["window"] = [state["window"][0] + batch_loss * n_global, state["window"][1] + n_global]
                if state["step"] % LOG_STEPS == LOG_STEPS - 1 or state["batch"] == len(batches) - 1:
                    # the loss curve: token-weighted mean over the steps since the last point
                    state["steps"].append({"step": state["step"] + 1, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                                           "train_loss": state["window"][0] / max(state["window"][1], 1)})
                    state["window"] = [0.0, 0]
                    if processes.is_main:
                        on_step_point(state["steps"][-1])
                state["loss_tokens"] += n_global
                state["real_tokens"] += int(counts[1])
                state["batch"] += 1
                state["step"] += 1
                state["seconds"] = time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(loss=f"{batch_loss:.3f}",
                                tok_s=f"{state['real_tokens'] / max(state['seconds'], 1e-9):.0f}")
                stop_now = counts[2] > 0
                if stop_now or (config.save_steps and state["step"] % config.save_steps == 0):
                    save()
                if stop_now:
                    bar.close()
                    raise KeyboardInterrupt
            bar.close()
            row = {"epoch": epoch, "train_loss": state["loss_sum"] / max(state["loss_tokens"], 1),
                   "eval_loss": evaluate_loss(model, eval_features, config.eval_batch_size, pad_id, device,
                                              precision, processes, config.max_batch_tokens) if eval_features else None,
                   "train_seconds": state["seconds"], "train_tokens": state["real_tokens"],
                   "train_tokens_per_second": state["real_tokens"] / max(state["seconds"], 1e-9),
                   "lr": scheduler.get_last_lr()[0], "largest_batch_tokens": state.pop("largest_batch_tokens", 0)}
            state["history"].append(row)
            state.update(epoch=epoch + 1, batch=0, loss_sum=0.0, loss_tokens=0, real_tokens=0, seconds=0.0)
            save()
            if processes.is_main:
                on_epoch_end(state["history"], state["steps"])
    return state["history"], state["steps"]
