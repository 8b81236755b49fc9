"""Guessed tokens (``--draft-tokens``, ``inference.lookup``) against one token a forward: questions
answered one at a time, as a server answers a lone request, each way; the forwards each question
took after its prompt, the seconds, and how many answers differ (none should).

    python benchmarks/drafting.py --model $(../shared/tools/get-smollm2) --adapter RUN/adapter \\
        --eval-file ../shared/data/squad/proxy-dev-v1.1.json --questions 200

First, what one forward costs by its rows and tokens (no cache; median of 7), which decides what a
guess is worth. ``--questions N`` takes N questions spread evenly over the file. The forwards
counted are the decoding ones (``inference.decoder``'s steps, plain or checking guesses), not the
prompt's prefill.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import Counter

import torch

import loraqa.inference.decoder as decoder
from loraqa.config import load_config
from loraqa.data.load import load_examples
from loraqa.data.features import build_eval_features
from loraqa.inference.answerer import load_answerer
from loraqa.model.lora import adapter_settings


def forward_seconds(model, rows: int, tokens: int, repeats: int = 7) -> float:
    """The median time of one forward of ``rows`` x ``tokens`` (next-token logits for every token)."""
    ids = torch.randint(0, 1000, (rows, tokens))
    with torch.inference_mode():
        model(input_ids=ids)  # warm
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - began)
    return sorted(times)[repeats // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter")
    parser.add_argument("--eval-file", required=True)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[0, 8])
    args = parser.parse_args()
    settings = {**(adapter_settings(args.adapter) if args.adapter else {}), "model": args.model}
    answerer = load_answerer(load_config(None, settings), args.adapter, [])
    examples = load_examples(args.eval_file, "validation")
    examples = examples[::max(1, len(examples) // args.questions)][:args.questions]
    s = answerer.settings
    features, _ = build_eval_features(answerer.tokenizer, examples, s.template, s.max_length, s.max_new_tokens)
    print("| one forward: rows x tokens | ms |\n| --- | ---: |")
    for rows, tokens in ((1, 1), (1, 9), (1, 17), (3, 9), (3, 15)):
        print(f"| {rows} x {tokens} | {1000 * forward_seconds(answerer.model, rows, tokens):.0f} |", flush=True)
    steps = [0]
    for name in ("_step", "verify"):  # a decoding forward: one token a row, or guesses checked
        def counted(*args, _run=getattr(decoder, name), **kwargs):
            steps[0] += 1
            return _run(*args, **kwargs)
        setattr(decoder, name, counted)
    runs = {}
    print("| --draft-tokens | questions | seconds | decoding forwards a question (mean) "
          "| forwards: 0 / 1 / 2 / 3 / more |")
    print("| ---: | ---: | ---: | ---: | --- |")
    for k in args.draft_tokens:
        answerer.settings = dataclasses.replace(s, draft_tokens=k, batch_size=1)
        answers, forwards, began = {}, [], time.perf_counter()
        for f in features:
            steps[0] = 0
            answers.update(answerer.decode([f], {f.id: ""}))
            forwards.append(steps[0])
        seconds = time.perf_counter() - began
        runs[k] = answers
        count = Counter(min(n, 4) for n in forwards)
        print(f"| {k} | {len(features)} | {seconds:.1f} | {sum(forwards) / len(forwards):.2f} | "
              f"{' / '.join(str(count[n]) for n in range(5))} |", flush=True)
    base = runs[args.draft_tokens[0]]
    for k, answers in runs.items():
        moved = sum(answers[i] != base[i] for i in base)
        print(f"--draft-tokens {k}: {moved} of {len(base)} answers differ from --draft-tokens {args.draft_tokens[0]}'s")


if __name__ == "__main__":
    main()
