"""Peak memory of chosen training steps of a run, replayed in a fresh process.

Rebuilds a run's training batches from its ``config.yaml`` (the same features and passage-batch
order as ``loraqa train``), then runs forward and backward on the given steps, one after another,
with the run's LoRA and checkpointing settings (the weights are the base model's: memory does not
depend on them), printing the process's peak resident set after each. Run it under each malloc to
compare them (``LORAQA_ALLOCATOR`` does not apply: this is not the ``loraqa`` command):

    python benchmarks/memory_steps.py runs/memory/recommended-4k-gc-mbt2048-s10/config.yaml 941 964 973 970 971
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 python benchmarks/memory_steps.py ...same...

The list in the config's batch order is what ``loraqa train`` logs as step N (1-based), first epoch.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from loraqa.data.batching import collate_context_train, context_batches, context_groups, micro_batches
from loraqa.config import load_config
from loraqa.data.features import build_train_features
from loraqa.model.lora import prepare_model
from loraqa.model.load import load_base, resolve_max_length
from loraqa.runs import load_questions
from loraqa.model.recompute import enable_gradient_checkpointing
from loraqa.runtime import allocator
from loraqa.training.loss import answer_loss_sum


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a run's config.yaml (passage batches: group_by_passage true)")
    p.add_argument("steps", type=int, nargs="+", help="optimizer steps of the first epoch, 1-based")
    args = p.parse_args()
    config = load_config(args.config)
    if not config.group_by_passage:
        raise SystemExit("this replays passage batches (group_by_passage: true)")
    model, tokenizer, _ = load_base(config)
    max_length = resolve_max_length(config, model, tokenizer)
    examples = load_questions(config, "train")
    features, _ = build_train_features(tokenizer, examples, config.template, max_length,
                                       no_answer_text=config.no_answer_text)
    batches = context_batches(context_groups(features), config.batch_size, config.seed + 1)
    torch.manual_seed(config.seed)
    model = prepare_model(model, config)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    print(f"malloc {allocator()}; model loaded: peak {peak_mb():,.0f} MB", flush=True)
    for step in args.steps:
        rows = [features[i] for i in batches[step - 1]]
        parts = micro_batches(rows, collate_context_train, tokenizer.pad_token_id, config.max_batch_tokens)
        start, before = time.perf_counter(), peak_mb()
        for part in parts:
            answer_loss_sum(model, part).backward()
        model.zero_grad(set_to_none=True)
        shapes = ", ".join(f"prefix {tuple(b['prefix_ids'].shape)} rows {tuple(b['input_ids'].shape)}" for b in parts)
        print(f"step {step} ({shapes}): peak {peak_mb():,.0f} MB (+{peak_mb() - before:,.0f}), "
              f"{time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
