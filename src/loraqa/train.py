"""The training loop: answer-only loss, AdamW, warmup + linear decay, clipping, eval loss per epoch."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from loraqa import IGNORE_INDEX
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


def train(model, train_features: list[Feature], eval_features: list[Feature], *, epochs: int,
          batch_size: int, lr: float, weight_decay: float, warmup_ratio: float, max_grad_norm: float,
          seed: int, pad_id: int, device: torch.device, precision: str, eval_batch_size: int,
          on_epoch_end: Callable[[dict], None] = lambda row: None, progress: bool = True) -> list[dict]:
    """Train in place; returns the history (one row per epoch) and calls ``on_epoch_end`` with each."""
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_features) / batch_size)
    total_steps = epochs * steps_per_epoch
    scheduler = get_linear_schedule_with_warmup(optimizer, round(warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    lengths = [len(f.input_ids) for f in train_features]
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        batches = length_grouped_batches(lengths, batch_size, seed=seed + epoch)
        loss_sum, loss_tokens, real_tokens, start = 0.0, 0, 0, time.perf_counter()
        bar = tqdm(batches, desc=f"epoch {epoch}/{epochs}", unit="step", disable=not progress)
        for indices in bar:
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
            loss_sum += loss.item() * n
            loss_tokens += n
            real_tokens += int(batch["attention_mask"].sum())
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{real_tokens / elapsed:.0f}")
        seconds = time.perf_counter() - start
        row = {"epoch": epoch, "train_loss": loss_sum / max(loss_tokens, 1),
               "eval_loss": evaluate_loss(model, eval_features, eval_batch_size, pad_id, device, precision),
               "train_seconds": seconds, "train_tokens": real_tokens,
               "train_tokens_per_second": real_tokens / seconds, "lr": scheduler.get_last_lr()[0]}
        history.append(row)
        on_epoch_end(row)
    return history
