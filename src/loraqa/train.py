"""The training loop: answer-only loss, AdamW, warmup + linear decay, clipping, eval loss per epoch."""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from loraqa import IGNORE_INDEX
from loraqa.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from loraqa.features import Feature, collate_train, length_grouped_batches
from loraqa.model import autocast

# Models whose logits are post-processed after the LM head; they take the plain (full-head) path.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def causal_lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over label positions, equal to ``model(**batch).loss``.

    Only positions whose next token is a label go through the LM head: the prompt's logits
    (most of each sequence, and a vocab-sized matmul per token) are never needed.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if any(getattr(lm.config, k, None) for k in _LOGIT_POSTPROCESSING):
        return model(**batch).loss
    hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).last_hidden_state  # (B, T, H)
    labels = batch["labels"][:, 1:]          # position t predicts token t + 1
    keep = labels != IGNORE_INDEX            # (B, T - 1)
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V), N = answer tokens
    return F.cross_entropy(logits.float(), labels[keep])


@torch.no_grad()
def evaluate_loss(model, features: list[Feature], batch_size: int, pad_id: int,
                  device: torch.device, precision: str) -> float:
    """Token-weighted mean answer loss over ``features`` (the eval file's first gold answers)."""
    model.eval()
    total, tokens = 0.0, 0
    order = sorted(features, key=lambda f: len(f.input_ids))
    for b in range(0, len(order), batch_size):
        batch = {k: v.to(device) for k, v in collate_train(order[b:b + batch_size], pad_id).items()}
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        with autocast(device, precision):
            total += causal_lm_loss(model, batch).item() * n
        tokens += n
    return total / max(tokens, 1)


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


def train(model, train_features: list[Feature], eval_features: list[Feature], *, epochs: int,
          batch_size: int, lr: float, weight_decay: float, warmup_ratio: float, max_grad_norm: float,
          seed: int, pad_id: int, device: torch.device, precision: str, eval_batch_size: int,
          on_epoch_end: Callable[[list[dict]], None] = lambda history: None, progress: bool = True,
          checkpoint_dir: Path | None = None, save_steps: int = 0, keep_checkpoints: int = 2) -> list[dict]:
    """Train in place; returns the history (one row per epoch), also passed to ``on_epoch_end``.

    With ``checkpoint_dir``, a checkpoint is saved every ``save_steps`` optimizer steps (0: never
    mid-epoch), at every epoch end, and on Ctrl-C; a later call with the same arguments resumes
    from the newest one and ends with the same weights as an uninterrupted run.
    """
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_features) / batch_size)
    total_steps = epochs * steps_per_epoch
    scheduler = get_linear_schedule_with_warmup(optimizer, round(warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    lengths = [len(f.input_ids) for f in train_features]
    # everything that a resumed run needs besides weights, optimizer, scheduler and RNG
    state = {"epoch": 1, "batch": 0, "step": 0, "loss_sum": 0.0, "loss_tokens": 0, "real_tokens": 0,
             "seconds": 0.0, "history": []}
    saved = list_checkpoints(checkpoint_dir) if checkpoint_dir else []
    if saved:
        state = load_checkpoint(saved[-1], model, optimizer, scheduler, scaler)
        print(f"[loraqa] resuming from {saved[-1]} (epoch {state['epoch']}, step {state['step']})",
              file=sys.stderr, flush=True)

    def save() -> None:
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir, state["step"], model, optimizer, scheduler, scaler, state, keep_checkpoints)

    with _StopRequest() as stop:
        for epoch in range(state["epoch"], epochs + 1):
            model.train()
            batches = length_grouped_batches(lengths, batch_size, seed=seed + epoch)
            bar = tqdm(total=len(batches), initial=state["batch"], desc=f"epoch {epoch}/{epochs}", unit="step",
                       disable=not progress)
            start = time.perf_counter() - state["seconds"]
            for indices in batches[state["batch"]:]:
                batch = {k: v.to(device) for k, v in collate_train([train_features[i] for i in indices], pad_id).items()}
                with autocast(device, precision):
                    loss = causal_lm_loss(model, batch)
                scaler.scale(loss).backward()
                if max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                state["loss_sum"] += loss.item() * n
                state["loss_tokens"] += n
                state["real_tokens"] += int(batch["attention_mask"].sum())
                state["batch"] += 1
                state["step"] += 1
                state["seconds"] = time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{state['real_tokens'] / state['seconds']:.0f}")
                if stop.requested or (save_steps and state["step"] % save_steps == 0):
                    save()
                if stop.requested:
                    bar.close()
                    raise KeyboardInterrupt
            bar.close()
            row = {"epoch": epoch, "train_loss": state["loss_sum"] / max(state["loss_tokens"], 1),
                   "eval_loss": evaluate_loss(model, eval_features, eval_batch_size, pad_id, device, precision),
                   "train_seconds": state["seconds"], "train_tokens": state["real_tokens"],
                   "train_tokens_per_second": state["real_tokens"] / max(state["seconds"], 1e-9),
                   "lr": scheduler.get_last_lr()[0]}
            state["history"].append(row)
            state.update(epoch=epoch + 1, batch=0, loss_sum=0.0, loss_tokens=0, real_tokens=0, seconds=0.0)
            save()
            on_epoch_end(state["history"])
    return state["history"]
