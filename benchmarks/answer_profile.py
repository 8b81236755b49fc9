"""Where answering's time goes: `loraqa evaluate`'s decoding, split by phase.

Loads what `loraqa evaluate` loads (the model, the adapter, the precision), answers the questions
once without the profiler (the wall-clock rate), then once under ``torch.profiler`` and splits the
time by the regions ``inference.generate`` marks: the passages' prefill, the copies of their keys
and values into each row, the questions' own prefill, and the decoding steps. Inside each region,
"kernels" is the time in the ops that do the model's arithmetic (matrix products, attention) and
"other" the rest: small ops, and Python between them. It also counts the decoding row-steps spent
on rows that had already stopped, and, with ``--compare-unmerged``, times the adapter applied
unmerged (PEFT's modules at every step) against the answering path.

    D=../shared/data/squad
    python benchmarks/answer_profile.py --model $(../shared/tools/get-smollm2) --adapter RUN/adapter \
        --eval-file $D/proxy-dev-v1.1.json --eval-examples 96 --precision fp32

``--forwards`` instead times one evaluation's forward calls with hooks (any number of questions,
about the time of ``loraqa evaluate``): prefill, and decoding steps by their number of rows.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager, nullcontext

import torch

REGIONS = ("prefill:passage", "cache:spread", "prefill:question", "cache:carry", "decode:step", "cache:compact")
# the ops that do the model's arithmetic; the rest of a region's time is small ops and Python
KERNELS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_attention_math", "aten::baddbmm", "aten::index_select", "aten::index_copy_")


def load(args, examples):
    from loraqa.config import Config
    from loraqa.inference.answerer import load_answerer

    given = {k: v for k, v in (("max_length", args.max_length), ("eval_batch_size", args.eval_batch_size),
                               ("eval_batch_tokens", args.eval_batch_tokens)) if v}
    config = Config(model=args.model, init=args.init, tokenizer=args.tokenizer, precision=args.precision,
                    max_new_tokens=args.max_new_tokens, seed=0, **given)
    return load_answerer(config, args.adapter, examples)


class Rows:
    """What loraqa's decoder did while counted: each row's tokens up to its stop ({tag: n}, the
    tags are the rows' places in the list of questions decoded), the batches, and the number of
    rows in each decoding step."""

    def __init__(self):
        self.lengths: dict[int, int] = {}
        self.batches = 0
        self.steps: list[int] = []


@contextmanager
def counting_rows(model):
    """Inside: ``inference.generate``'s decoding (``inference.decoder.decode``) records what it
    generated, and ``model``'s decoding steps their rows, into the ``Rows`` yielded."""
    from loraqa.inference import generate

    rows, original = Rows(), generate.decode

    def batches_counted(batches):
        for batch in batches:
            rows.batches += 1
            yield batch

    def counted(model, batches, *a, **k):
        for tag, tokens, watched in original(model, batches_counted(batches), *a, **k):
            rows.lengths[tag] = len(tokens)
            yield tag, tokens, watched

    def step(module, args, kwargs):
        if kwargs["input_ids"].size(1) == 1:
            rows.steps.append(kwargs["input_ids"].size(0))

    generate.decode = counted
    hook = model.register_forward_pre_hook(step, with_kwargs=True)
    try:
        yield rows
    finally:
        generate.decode = original
        hook.remove()


@contextmanager
def timing_forwards(model):
    """Inside: every call of ``model`` appends (rows, input width, seconds) to the list yielded (a
    hook on the model alone, so it times any version of loraqa's decoding)."""
    calls, started = [], []
    pre = model.register_forward_pre_hook(lambda m, a, k: started.append(time.perf_counter()), with_kwargs=True)

    def done(module, args, kwargs, out):
        ids = kwargs["input_ids"]
        calls.append((ids.size(0), ids.size(1), time.perf_counter() - started.pop()))

    post = model.register_forward_hook(done, with_kwargs=True)
    try:
        yield calls
    finally:
        pre.remove()
        post.remove()


def forwards_report(answerer, examples) -> None:
    """One evaluation, no warm-up, no profiler: its forward calls, prefill against decoding steps
    by their number of rows."""
    from loraqa.inference.evaluation import evaluate

    with timing_forwards(answerer.model) as calls:
        start = time.perf_counter()
        evaluate(answerer.model, answerer.tokenizer, examples, answerer.settings, answerer.device,
                 answerer.precision, progress=False)
        seconds = time.perf_counter() - start
    prefill = [c for c in calls if c[1] > 1]
    steps = [c for c in calls if c[1] == 1]
    print(f"{len(examples)} questions: {seconds:.1f} s = {len(examples) / seconds:.2f} questions/s")
    print(f"prefill: {len(prefill)} calls, {sum(c[2] for c in prefill):.1f} s, "
          f"{sum(c[0] * c[1] for c in prefill)} token-rows")
    print(f"decoding: {len(steps)} steps, {sum(c[2] for c in steps):.1f} s, {sum(c[0] for c in steps)} row-steps")
    for low, high in ((1, 1), (2, 4), (5, 8), (9, 16), (17, 64), (65, 10**6)):
        some = [c for c in steps if low <= c[0] <= high]
        if some:
            print(f"  steps of {low}-{high} rows: {len(some)}, {sum(c[2] for c in some):.1f} s "
                  f"({1000 * sum(c[2] for c in some) / len(some):.0f} ms each)")


def run(answerer, examples, profile: bool):
    """(predictions, seconds, Rows, the profile or None) of one evaluation of ``examples``."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from loraqa.inference.evaluation import evaluate

    with counting_rows(answerer.model) as rows, \
            (torch_profile(activities=[ProfilerActivity.CPU]) if profile else nullcontext()) as prof:
        start = time.perf_counter()
        predictions, _, _ = evaluate(answerer.model, answerer.tokenizer, examples, answerer.settings,
                                     answerer.device, answerer.precision, progress=False)
        seconds = time.perf_counter() - start
    return predictions, seconds, rows, prof


def split(prof) -> dict[str, dict[str, float]]:
    """{region: {"total": s, "kernels": s}} from the profile's events (a kernel is counted in the
    region whose time span holds it)."""
    events = prof.events()
    spans = [(e.name, e.time_range.start, e.time_range.end) for e in events if e.name in REGIONS]
    spans.sort(key=lambda s: s[1])
    out = {r: {"total": 0.0, "kernels": 0.0} for r in REGIONS}
    for name, start, end in spans:
        out[name]["total"] += (end - start) / 1e6
    starts = [s[1] for s in spans]
    import bisect
    for e in events:
        if e.name not in KERNELS:
            continue
        i = bisect.bisect_right(starts, e.time_range.start) - 1
        if i >= 0 and e.time_range.end <= spans[i][2]:
            out[spans[i][0]]["kernels"] += e.self_cpu_time_total / 1e6
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--init", default="pretrained", choices=["pretrained", "random"])
    p.add_argument("--tokenizer")
    p.add_argument("--adapter")
    p.add_argument("--eval-file", required=True)
    p.add_argument("--eval-examples", type=int, default=96)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, help="default: loraqa evaluate's")
    p.add_argument("--eval-batch-tokens", type=int, help="default: loraqa evaluate's")
    p.add_argument("--max-length", type=int)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--compare-unmerged", action="store_true",
                   help="also time the adapter applied unmerged (its share of the time)")
    p.add_argument("--forwards", action="store_true",
                   help="only: one evaluation, its forward calls timed (prefill; decoding steps by rows)")
    args = p.parse_args()

    from loraqa.data.load import load_examples
    from loraqa.inference.generate import stop_token_ids
    from loraqa.runtime import keep_freed_memory

    keep_freed_memory()  # what the `loraqa` command does at start
    examples = load_examples(args.eval_file, "validation", args.eval_examples)
    answerer = load(args, examples)
    stop_token_ids(answerer.tokenizer)
    if args.forwards:
        return forwards_report(answerer, examples)
    run(answerer, examples, profile=False)  # warm-up, on the same questions: first-call costs are not the steady state
    predictions, seconds, rows, _ = run(answerer, examples, profile=False)
    _, prof_seconds, _, prof = run(answerer, examples, profile=True)
    print(f"model {args.model} ({args.init}), adapter {args.adapter}, precision {answerer.precision}, "
          f"{len(examples)} questions, max_new_tokens {args.max_new_tokens}, {torch.get_num_threads()} threads")
    print(f"wall clock: {seconds:.2f} s = {len(examples) / seconds:.2f} questions/s "
          f"({rows.batches} batches)")
    needed = sum(n - 1 for n in rows.lengths.values())  # a row's first token comes from its prefill
    few = [n for n in rows.steps if n <= 4]
    print(f"decoding: {len(rows.steps)} steps, {sum(rows.steps)} row-steps computed, {needed} needed (each row "
          f"up to its stop token); {len(few)} steps of 4 rows or fewer")
    parts = split(prof)
    covered = sum(v["total"] for v in parts.values())
    print(f"\nunder the profiler: {prof_seconds:.2f} s (profiling adds its own overhead per op)")
    print(f"{'region':18s} {'seconds':>8s} {'share':>6s} {'kernels':>8s} {'other':>8s}")
    for name, v in parts.items():
        if v["total"]:
            print(f"{name:18s} {v['total']:8.2f} {100 * v['total'] / prof_seconds:5.1f}% {v['kernels']:8.2f} "
                  f"{v['total'] - v['kernels']:8.2f}")
    print(f"{'outside regions':18s} {prof_seconds - covered:8.2f} {100 * (prof_seconds - covered) / prof_seconds:5.1f}%"
          f"   (tokenising, batching, decoding text, scoring)")
    if args.compare_unmerged and args.adapter:
        from loraqa.model.lora import load_adapter
        unmerged = load(argparse.Namespace(**{**vars(args), "adapter": None}), examples)
        unmerged.model = load_adapter(unmerged.model, args.adapter)
        unmerged.model.eval()
        run(unmerged, examples, profile=False)
        other, unmerged_seconds, _, _ = run(unmerged, examples, profile=False)
        moved = sum(other[k] != v for k, v in predictions.items())
        print(f"\nadapter applied unmerged: {unmerged_seconds:.2f} s = {len(examples) / unmerged_seconds:.2f} "
              f"questions/s ({100 * (unmerged_seconds - seconds) / unmerged_seconds:.0f}% of its time is the adapter's); "
              f"{moved} of {len(predictions)} predictions differ from the path above")


if __name__ == "__main__":
    main()
