"""`loraqa serve` under load, on loopback: N concurrent clients against the same requests sent one at
a time; throughput, p50/p95 latency, errors, and whether the answers are `loraqa ask`'s.

    python benchmarks/serve.py --model ../shared/data/gpt2 --init random \
        --eval-file ../shared/data/squad/proxy-dev-v1.1.json --requests 64 --max-new-tokens 16

    python benchmarks/serve.py --model ../shared/data/gpt2 --init random --soak 180 --clients 8

--soak SECONDS: instead, N clients ask in a loop for that long (after a --warmup), bounded in time
and count; prints requests, errors, p50/p95 latency, and the server's RSS after the warm-up and at
the end.

--adapters 1,4,16 (with --adapter, a trained one): several adapters on one server, mixed in batches,
against one merged adapter and one adapter at a time (benchmarks/serve_adapters.py); with --soak,
clients spread over the adapters while another is loaded and unloaded every --reload seconds.

The server is the real command (`python -m loraqa.cli serve ...`) in a subprocess on 127.0.0.1; the
requests are the file's first passages with all their questions (several questions a passage, as
users ask), one `POST /answer` each. Then `ask` runs in this process with the same settings and
its answers are compared. Everything is bounded: the request count, each request's timeout, and a
deadline for the whole run; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from serve_client import concurrent, one_at_a_time, post, soak, start_server, summary, wait_healthy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--init", default="pretrained", choices=["pretrained", "random"])
    parser.add_argument("--adapter")
    parser.add_argument("--eval-file", default="../shared/data/squad/proxy-dev-v1.1.json")
    parser.add_argument("--requests", type=int, default=64, help="concurrent clients, one request each")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--deadline", type=float, default=1200.0, help="seconds the whole run may take")
    parser.add_argument("--soak", type=float, help="seconds of a soak: --clients ask in a loop (after --warmup)")
    parser.add_argument("--clients", type=int, default=8, help="soak: clients asking at once")
    parser.add_argument("--warmup", type=float, default=20.0, help="soak: seconds before latencies and RSS count")
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="soak: a bound on requests sent")
    parser.add_argument("--adapters", help="K[,K...]: several adapters on one server (needs --adapter)")
    parser.add_argument("--reload", type=float, default=60.0, help="soak with --adapters: seconds between a load "
                                                                   "and an unload of another adapter")
    args = parser.parse_args()
    if not 1 <= args.requests <= 1024:
        raise SystemExit("--requests must be in 1..1024")
    # a soak runs for its own --soak seconds; the deadline bounds the start and the end around it
    deadline = time.monotonic() + args.deadline + ((args.soak or 0) + args.warmup + args.timeout if args.soak else 0)

    from loraqa.config import load_config
    from loraqa.data.load import load_file
    from loraqa.inference.answerer import ask

    examples = load_file(args.eval_file, "validation")[:args.requests]  # file order: a passage's questions together
    bodies = [{"context": ex.context, "question": ex.question} for ex in examples]
    if args.adapters:
        if not args.adapter:
            raise SystemExit("--adapters needs --adapter (a trained adapter; the others are variants of it)")
        import serve_adapters

        (serve_adapters.run_soak if args.soak else serve_adapters.run)(args, bodies, deadline)
        return
    with start_server(args, ["--adapter", args.adapter] if args.adapter else [], deadline) as base:
        if args.soak:
            report = soak(f"{base}/answer", bodies, args.server_pid, args)
            print(json.dumps(report), flush=True)  # before anything else can fail
            print(f"server after the soak: {wait_healthy(base, None, deadline)}")
            return
        post(f"{base}/answer", bodies[0], args.timeout)  # warm-up: first-call costs are no request's
        seq, seq_wall = one_at_a_time(f"{base}/answer", bodies, args.timeout)
        if time.monotonic() > deadline:
            raise SystemExit("past --deadline after the one-at-a-time pass")
        health_before = wait_healthy(base, None, deadline)
        par, par_wall = concurrent(f"{base}/answer", bodies, args.timeout)
        health = wait_healthy(base, None, deadline)
    config = load_config(None, {"model": args.model, "init": args.init, "max_new_tokens": args.max_new_tokens,
                                "precision": args.precision})
    expected = ask(config, args.adapter, examples)
    rows = [summary("one at a time", seq, seq_wall), summary(f"{len(bodies)} concurrent", par, par_wall)]
    for row, results in zip(rows, (seq, par)):
        row["same_as_ask"] = sum(r[1] == expected[ex.id] for r, ex in zip(results, examples))
    report = {"requests": len(bodies), "passages": len({ex.context for ex in examples}),
              "max_new_tokens": args.max_new_tokens, "precision": health["precision"],
              "concurrent_batches": health["batches"] - health_before["batches"],
              "speedup": round(rows[1]["requests_per_s"] / rows[0]["requests_per_s"], 2), "rows": rows}
    print(json.dumps(report, indent=2))
    print("\n| mode | requests | errors | wall s | requests/s | p50 s | p95 s | same as ask |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['requests']} | {r['errors']} | {r['wall_s']} | {r['requests_per_s']} | "
              f"{r['p50_s']} | {r['p95_s']} | {r['same_as_ask']}/{r['requests']} |")
    print(f"\nthroughput {report['speedup']}x one at a time; the {len(bodies)} concurrent requests were decoded "
          f"in {report['concurrent_batches']} batches")
    errors = [r[2] for r in seq + par if r[2]]
    if errors:
        print("first errors:", *errors[:3], sep="\n  ", file=sys.stderr)


if __name__ == "__main__":
    main()
