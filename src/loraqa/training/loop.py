"""The training loop: answer-only loss, AdamW, warmup + linear decay, clipping, an eval loss each
epoch, checkpoints, Ctrl-C. One process or several (``torchrun`` / ``accelerate launch``): see
``training.step`` for how a step is shared.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from loraqa.config import Config
from loraqa.data.features import Feature
from loraqa.model.support import passages_apart_differ
from loraqa.training.checkpoint import (agree_on_checkpoint, checkpoint_step, list_checkpoints, load_checkpoint,
                                        problem_here, save_checkpoint, set_aside, together)
from loraqa.training.loss import AnswerLoss, evaluate_loss
from loraqa.training.processes import Processes
from loraqa.training.step import StepPlan, StepResult, apply_update, forward_backward

LOG_STEPS = 10  # optimizer steps per point of the loss curve (steps.jsonl)


@dataclass
class LoopState:
    """Where the loop is and its running sums: all that a resumed run needs besides the weights,
    optimizer, scheduler and RNG (a checkpoint's ``state.json``)."""
    epoch: int = 1
    batch: int = 0            # steps taken in this epoch
    step: int = 0             # optimizer steps taken in all
    loss_sum: float = 0.0     # this epoch: answer-token loss, summed
    loss_tokens: int = 0      # this epoch: answer tokens
    real_tokens: int = 0      # this epoch: tokens the model ran
    seconds: float = 0.0      # this epoch: time spent in steps
    history: list[dict] = field(default_factory=list)  # one row per finished epoch
    steps: list[dict] = field(default_factory=list)    # the loss curve
    window: list = field(default_factory=lambda: [0.0, 0])  # (loss sum, tokens) since the curve's last point
    precision: str = "fp32"
    largest_batch_tokens: int = 0  # this epoch: padded tokens of the largest micro-batch

    def record_step(self, result: StepResult, epoch: int, lr: float, last_in_epoch: bool) -> dict | None:
        """Add one step; returns the loss curve's new point when this step ends one (every
        ``LOG_STEPS`` steps and at the epoch's end): the token-weighted mean since the last."""
        weighted = result.loss * result.answer_tokens
        self.loss_sum += weighted
        self.window = [self.window[0] + weighted, self.window[1] + result.answer_tokens]
        point = None
        if self.step % LOG_STEPS == LOG_STEPS - 1 or last_in_epoch:
            point = {"step": self.step + 1, "epoch": epoch, "lr": lr,
                     "train_loss": self.window[0] / max(self.window[1], 1)}
            self.steps.append(point)
            self.window = [0.0, 0]
        self.loss_tokens += result.answer_tokens
        self.real_tokens += result.real_tokens
        self.largest_batch_tokens = max(self.largest_batch_tokens, result.largest)
        self.batch += 1
        self.step += 1
        return point

    def end_epoch(self, epoch: int, eval_loss: float | None, lr: float) -> None:
        """Append the epoch's row to ``history`` and start the next epoch's sums."""
        self.history.append({
            "epoch": epoch, "train_loss": self.loss_sum / max(self.loss_tokens, 1), "eval_loss": eval_loss,
            "train_seconds": self.seconds, "train_tokens": self.real_tokens,
            "train_tokens_per_second": self.real_tokens / max(self.seconds, 1e-9), "lr": lr,
            "largest_batch_tokens": self.largest_batch_tokens})
        self.epoch, self.batch, self.loss_sum, self.loss_tokens, self.real_tokens = epoch + 1, 0, 0.0, 0, 0
        self.seconds, self.largest_batch_tokens = 0.0, 0


def train(model, train_features: list[Feature], eval_features: list[Feature], config: Config, *,
          pad_id: int, device: torch.device, precision: str, processes: Processes | None = None,
          on_epoch_end: Callable[[list[dict], list[dict]], None] = lambda history, steps: None,
          on_step_point: Callable[[dict], None] = lambda point: None, progress: bool = True,
          checkpoint_dir: Path | None = None) -> tuple[list[dict], list[dict]]:
    """Train in place with ``config``'s settings; returns (history, steps): one row per epoch, and
    the loss curve (each point also passed to ``on_step_point``).

    With ``checkpoint_dir``, a checkpoint is saved every ``config.save_steps`` optimizer steps (0:
    never mid-epoch), at every epoch end, and on Ctrl-C; a later call with the same arguments
    resumes from the newest one and ends with the same weights as an uninterrupted run.
    """
    processes = processes or Processes.single()
    if config.batch_size % processes.world:
        raise ValueError(f"--batch-size {config.batch_size} must be a multiple of the {processes.world} processes")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total_steps = config.epochs * math.ceil(len(train_features) / config.batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(config.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_module = processes.wrap(AnswerLoss(model))
    differ = passages_apart_differ(model) if config.group_by_passage else None
    if differ:
        processes.log(f"--group-by-passage is off for this model: {differ}")
    plan = StepPlan(train_features, config, pad_id, processes, passages_apart=differ is None)
    state = resume(checkpoint_dir, model, optimizer, scheduler, scaler, processes) or LoopState(precision=precision)
    log_largest_batch(plan.largest_batch_tokens(state.epoch), config, processes)

    def save() -> Path | None:
        if checkpoint_dir is None:
            return None
        return save_checkpoint(checkpoint_dir, state.step, model, optimizer, scheduler, scaler,
                               dataclasses.asdict(state), config.keep_checkpoints, processes)

    with StopRequest() as stop:
        for epoch in range(state.epoch, config.epochs + 1):
            model.train()
            batches = plan.epoch(epoch)
            bar = tqdm(total=len(batches), initial=state.batch, desc=f"epoch {epoch}/{config.epochs}",
                       unit="step", disable=not (progress and processes.is_main))
            start = time.perf_counter() - state.seconds
            for indices in batches[state.batch:]:
                # read first: a Ctrl-C during the last step stops here, with that step done; one from now on
                # lets this step end
                requested = stop.requested
                result = forward_backward(loss_module, plan.parts(indices, device), scaler, processes, device,
                                          precision, requested)
                if result.stop:  # agreed by every process before this step computed anything
                    bar.close()
                    raise Stopped(state.step, save())
                apply_update(params, optimizer, scheduler, scaler, config.max_grad_norm)
                point = state.record_step(result, epoch, scheduler.get_last_lr()[0], state.batch == len(batches) - 1)
                if point and processes.is_main:
                    on_step_point(point)
                state.seconds = time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{state.real_tokens / max(state.seconds, 1e-9):.0f}")
                if config.save_steps and state.step % config.save_steps == 0:
                    save()
            bar.close()
            eval_loss = evaluate_loss(model, eval_features, config.eval_batch_size, pad_id, device, precision,
                                      processes, config.max_batch_tokens) if eval_features else None
            state.end_epoch(epoch, eval_loss, scheduler.get_last_lr()[0])
            save()
            if processes.is_main:
                on_epoch_end(state.history, state.steps)
    return state.history, state.steps


def resume(checkpoint_dir: Path | None, model, optimizer, scheduler, scaler, processes: Processes) -> LoopState | None:
    """The newest checkpoint in ``checkpoint_dir`` that every process can load, loaded into the
    model, optimizer, scheduler, scaler and RNG, and its loop state; None when there is none.
    The processes agree on it before any loads anything: each checks what it can read, a
    collective brings every view to every process, and each takes the same one from them
    (``agree_on_checkpoint``). A newer one that some process cannot load (a file missing, short or
    changed against its manifest) is set aside, said in one line; with none sound, the run starts
    from the beginning, said so. A load failing on one process stops every process."""
    if checkpoint_dir is None:
        return None
    saved = {checkpoint_step(c): c for c in list_checkpoints(checkpoint_dir)}
    newest_first = sorted(saved, reverse=True)
    checked: dict[int, str | None] = {}

    def view(steps: list[int]) -> dict[int, str | None]:
        for step in steps:
            if step not in checked:
                checked[step] = problem_here(saved[step], processes.rank)
        return {step: checked[step] for step in steps}

    # the newest alone first: where every process can load it (the common case) no older one is
    # hashed (a full fine-tuning's checkpoint takes seconds); the views decide the same everywhere
    views = processes.gather([view(newest_first[:1])])
    chosen, passed = agree_on_checkpoint(views)
    if chosen is None and any(views):
        chosen, passed = agree_on_checkpoint(processes.gather([view(newest_first)]))
    loaded = {}

    def set_aside_and_load() -> None:
        for step, problem in passed.items():  # newest first
            if processes.is_main and step in saved:
                problem += f"; set aside as {set_aside(saved[step]).name}"
            processes.log(f"checkpoint step-{step:08d} is damaged ({problem}); trying the one before")
        if chosen is not None:
            loaded["state"] = load_checkpoint(saved[chosen], model, optimizer, scheduler, scaler, processes.rank)

    what = f"resuming from {saved[chosen]}" if chosen is not None else f"setting aside checkpoints in {checkpoint_dir}"
    together(processes, set_aside_and_load, what)
    if chosen is None:
        if passed:
            processes.log(f"no sound checkpoint in {checkpoint_dir} ({len(passed)} damaged): training starts from "
                          "the beginning")
        return None
    state = LoopState(**loaded["state"])
    processes.log(f"resuming from {saved[chosen]} (epoch {state.epoch}, step {state.step})")
    return state


def log_largest_batch(tokens: int, config: Config, processes: Processes) -> None:
    processes.log(f"largest batch this epoch: {tokens:,} tokens with padding"
                  + (f" (micro-batches of at most {config.max_batch_tokens:,})" if config.max_batch_tokens else "")
                  + (", gradient checkpointing on" if config.gradient_checkpointing else ""))


class Stopped(KeyboardInterrupt):
    """Training stopped at Ctrl-C after the step in progress, with ``checkpoint`` saved (None: the
    run keeps no checkpoints)."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"stopped after step {step}")
        self.step, self.checkpoint = step, checkpoint


class StopRequest:
    """Ctrl-C sets a flag; the loop saves a checkpoint at the next step boundary, then stops. A
    second Ctrl-C stops at once (a plain KeyboardInterrupt: nothing more is saved)."""

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


