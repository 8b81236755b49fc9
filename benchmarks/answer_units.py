"""Answering on a CPU's units: what each numeric setting gains in questions/s and what it moves.

    python benchmarks/answer_units.py --model $(../shared/tools/get-smollm2) --adapter RUN/adapter \\
        --eval-file ../shared/data/squad/proxy-dev-v1.1.json --questions 304

The adapter merged into the base, the same questions answered by ``loraqa evaluate``'s decoder with:
fp32 (the reference); fp32 weights with bf16 products (``torch.backends.mkldnn.matmul.fp32_precision
= "bf16"``: oneDNN rounds each product's inputs to bf16 and runs it on AMX / AVX-512 BF16); bf16
weights and products (``--precision bf16``); PyTorch's dynamic int8 (``quantize_dynamic``: int8
weights, each activation quantised per call, int8 products on AMX-INT8 / VNNI). For each:
questions/s, answers equal to fp32's, EM/F1, and how many of the first ``--batch-check`` questions
get the same answer decoded one at a time as in the full batches (batch invariance). The CPU is named.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import time

import torch
from llama_cpp_side import cpu_name  # benchmarks/, beside this file

from loraqa.config import load_config
from loraqa.data.load import load_file
from loraqa.inference.answerer import load_answerer
from loraqa.scoring.score import score


@contextlib.contextmanager
def bf16_products():
    previous = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = previous


def measure(answerer, features, contexts, batch_check: int, context=contextlib.nullcontext) -> dict:
    with context():
        answerer.decode(features[:8], contexts)  # warm-up
        start = time.perf_counter()
        answers = answerer.decode(features, contexts)
        seconds = time.perf_counter() - start
        one = dataclasses.replace(answerer, settings=dataclasses.replace(answerer.settings, batch_size=1))
        alone = one.decode(features[:batch_check], contexts)
    return {"seconds": seconds, "answers": answers,
            "batch_same": sum(alone[f.id] == answers[f.id] for f in features[:batch_check])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--eval-file", required=True)
    parser.add_argument("--questions", type=int, default=304)
    parser.add_argument("--batch-check", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--settings", default="fp32,fp32-bf16-products,bf16,int8-dynamic")
    args = parser.parse_args()
    examples = load_file(args.eval_file, "validation")[:args.questions]
    config = load_config(None, {"model": args.model, "max_new_tokens": args.max_new_tokens, "precision": "fp32"})
    fp32 = load_answerer(config, args.adapter, examples)
    features, _ = fp32.features(examples)
    contexts = {ex.id: ex.context for ex in examples}
    results = {}
    for setting in args.settings.split(","):
        if setting == "fp32":
            results[setting] = measure(fp32, features, contexts, args.batch_check)
        elif setting == "fp32-bf16-products":
            results[setting] = measure(fp32, features, contexts, args.batch_check, bf16_products)
        elif setting == "bf16":
            bf16 = load_answerer(load_config(None, {**config.to_dict(), "precision": "bf16"}), args.adapter, examples)
            results[setting] = measure(bf16, features, contexts, args.batch_check)
            del bf16
        elif setting == "int8-dynamic":
            model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32.model), {torch.nn.Linear},
                                                           dtype=torch.qint8)
            results[setting] = measure(dataclasses.replace(fp32, model=model), features, contexts,
                                       args.batch_check)
            del model
        else:
            parser.error(f"unknown setting {setting!r}")
        print(f"{setting}: {len(features) / results[setting]['seconds']:.2f} questions/s", flush=True)
    reference = results.get("fp32")
    print(f"\n{len(features)} questions, {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"batch invariance on the first {args.batch_check}\n")
    print("| answering | questions/s | x fp32 | answers equal to fp32's | EM | F1 | same one at a time |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for setting, r in results.items():
        rate = len(features) / r["seconds"]
        scores = score(examples, r["answers"])
        same = (f"{sum(r['answers'][f.id] == reference['answers'][f.id] for f in features)}/{len(features)}"
                if reference else "-")
        speedup = f"{rate / (len(features) / reference['seconds']):.2f}" if reference else "-"
        print(f"| {setting} | {rate:.2f} | {speedup} | {same} | {scores['exact_match']:.2f} | {scores['f1']:.2f} "
              f"| {r['batch_same']}/{min(args.batch_check, len(features))} |")


if __name__ == "__main__":
    main()
