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
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def post(url: str, body: dict, timeout: float) -> tuple[float, str | None, str | None]:
    """(seconds, answer, error) for one request."""
    start = time.perf_counter()
    try:
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return time.perf_counter() - start, json.loads(response.read())["answer"], None
    except urllib.error.HTTPError as e:
        return time.perf_counter() - start, None, f"{e.code}: {e.read().decode()[:200]}"
    except Exception as e:  # noqa: BLE001 - counted as an error, the run goes on
        return time.perf_counter() - start, None, f"{type(e).__name__}: {e}"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summary(name: str, results: list, wall: float) -> dict:
    latencies = [r[0] for r in results]
    return {"mode": name, "requests": len(results), "errors": sum(r[2] is not None for r in results),
            "wall_s": round(wall, 3), "requests_per_s": round(len(results) / wall, 3),
            "p50_s": round(percentile(latencies, 50), 3), "p95_s": round(percentile(latencies, 95), 3)}


def one_at_a_time(url: str, bodies: list[dict], timeout: float) -> tuple[list, float]:
    start = time.perf_counter()
    return [post(url, b, timeout) for b in bodies], time.perf_counter() - start


def concurrent(url: str, bodies: list[dict], timeout: float) -> tuple[list, float]:
    """One client thread per request, released together."""
    results: list = [None] * len(bodies)
    gate = threading.Barrier(len(bodies) + 1)

    def client(i: int) -> None:
        gate.wait()
        results[i] = post(url, bodies[i], timeout)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(bodies))]
    for t in threads:
        t.start()
    gate.wait()
    start = time.perf_counter()
    end = start + timeout
    for t in threads:
        t.join(max(0.0, end - time.perf_counter()))
    wall = time.perf_counter() - start
    return [r or (timeout, None, "no reply in time") for r in results], wall


def rss_mb(pid: int) -> float:
    """The resident set size of process ``pid`` now (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no VmRSS for process {pid}")


def soak(url: str, bodies: list[dict], pid: int, args) -> dict:
    """``args.clients`` threads post ``bodies`` round-robin until the warm-up and the soak have
    passed (or ``args.max_requests`` were sent); latencies and errors count after the warm-up."""
    start = time.monotonic()
    warm_end, end = start + args.warmup, start + args.warmup + args.soak
    results: list = []
    sent = iter(range(args.max_requests))
    lock = threading.Lock()

    def client(c: int) -> None:
        i = c
        while time.monotonic() < end:
            with lock:
                if next(sent, None) is None:
                    return
            result = post(url, bodies[i % len(bodies)], args.timeout)
            if time.monotonic() > warm_end and time.monotonic() < end + args.timeout:
                with lock:
                    results.append(result)
            i += args.clients

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, warm_end - time.monotonic()))
    rss = [(0.0, rss_mb(pid))]
    while time.monotonic() < end:  # RSS once a minute, and at the end
        time.sleep(min(60.0, max(0.0, end - time.monotonic())))
        rss.append((round(time.monotonic() - warm_end, 1), rss_mb(pid)))
    for t in threads:
        t.join(args.timeout + 5)
    report = summary(f"soak {args.soak:g} s, {args.clients} clients", results, args.soak)
    report.update({"rss_after_warmup_mb": round(rss[0][1], 1), "rss_end_mb": round(rss[-1][1], 1),
                   "rss_growth": round(rss[-1][1] / rss[0][1] - 1, 4), "rss_curve_mb": rss})
    return report


def wait_healthy(base: str, server: subprocess.Popen | None, deadline: float) -> dict:
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not answer /health in time")


@contextmanager
def start_server(args, adapter_flags: list[str], deadline: float):
    """The real ``loraqa serve`` on a free loopback port, with ``adapter_flags``; yields its URL
    (``args.server_pid`` its process), stopped after."""
    with socket.socket() as s:  # a free loopback port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "loraqa.cli", "serve", "--model", args.model, "--init", args.init,
               "--max-new-tokens", str(args.max_new_tokens), "--precision", args.precision, *adapter_flags,
               "--host", "127.0.0.1", "--port", str(port), "--max-batch-size", str(args.max_batch_size),
               "--max-wait-ms", str(args.max_wait_ms)]
    print("server:", " ".join(command[1:]), file=sys.stderr)
    with open(Path("/tmp") / f"loraqa-serve-{port}.log", "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    args.server_pid = server.pid
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, server, deadline)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


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
