"""Several LoRA adapters on one `loraqa serve` (``benchmarks/serve.py --adapters 1,4,16``), on loopback.

For each K: the same requests (the file's first passages, all their questions) spread over K
adapters, each passage's questions asked of one adapter (passage i of adapter i mod K: each
customer asks about its own documents; a passage asked of several adapters is prefilled once for
each, as a LoRA changes its keys), sent by ``--clients`` clients that each keep one request in flight
(a server under steady load), to: one merged adapter (``--adapter PATH``: today's single model, all
requests to it); a server holding the K adapters, mixing them in batches; and the same server
decoding one adapter's requests at a time (``--one-adapter-per-batch``: what servers that cannot mix
adapters do). Throughput (requests/s), latency, and whether each answer is its adapter's alone (the
mixed run's against the one-at-a-time run's: the same adapters, other batches).

The K adapters are ``--adapter`` (trained) and K-1 variants of it, each LoRA B scaled by a factor of
its own (seeded): the same shapes and cost as K trained adapters, other answers.

``--soak SECONDS --adapters 4``: ``--clients`` ask in a loop, spread over the 4 adapters, while an
extra adapter is loaded and unloaded every ``--reload`` seconds (the admin key): requests,
errors, latency and the server's RSS over time.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from serve_client import post, soak, start_server, summary, wait_healthy

ADMIN_KEY = "benchmark-admin"


def make_adapters(source: str, k: int, folder: Path) -> list[str]:
    """``source`` and K-1 variants of it (B scaled by a seeded factor in 0.5..1.5)."""
    from safetensors.torch import load_file, save_file

    weights, paths = load_file(Path(source) / "adapter_model.safetensors"), []
    for i in range(k):
        out = folder / f"a{i}"
        shutil.copytree(source, out, dirs_exist_ok=True)
        if i:
            factor = random.Random(i).uniform(0.5, 1.5)
            save_file({n: t * factor if "lora_B" in n else t for n, t in weights.items()},
                      out / "adapter_model.safetensors", metadata={"format": "pt"})
        paths.append(str(out))
    return paths


def closed_loop(url: str, bodies: list[dict], clients: int, timeout: float) -> tuple[list, float]:
    """``clients`` threads, each posting the next of ``bodies`` when its last one is answered."""
    results: list = [None] * len(bodies)
    order, lock = iter(range(len(bodies))), threading.Lock()

    def client() -> None:
        while True:
            with lock:
                n = next(order, None)
            if n is None:
                return
            results[n] = post(url, bodies[n], timeout)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * len(bodies))
    return [r or (timeout, None, "no reply in time") for r in results], time.perf_counter() - start


def run(args, bodies: list[dict], deadline: float) -> None:
    ks = sorted({int(k) for k in args.adapters.split(",")})
    passages = list(dict.fromkeys(b["context"] for b in bodies))
    folder = Path(tempfile.mkdtemp(prefix="loraqa-adapters-"))
    try:
        adapters = make_adapters(args.adapter, max(ks), folder)
        rows = []
        with start_server(args, ["--adapter", adapters[0]], deadline) as base:
            post(f"{base}/answer", bodies[0], args.timeout)  # warm-up
            merged, merged_wall = closed_loop(f"{base}/answer", bodies, args.clients, args.timeout)
        rows.append({**summary("1 adapter, merged", merged, merged_wall), "same": "-"})
        for k in ks:
            named = [x for i in range(k) for x in ("--adapter", f"a{i}={adapters[i]}")]
            asked = [{**b, "model": f"a{passages.index(b['context']) % k}"} for b in bodies]
            runs = {}
            for mode, flags in (("mixed", []), ("one at a time", ["--one-adapter-per-batch"])):
                with start_server(args, named + flags, deadline) as base:
                    for i in range(k):
                        post(f"{base}/answer", {**bodies[0], "model": f"a{i}"}, args.timeout)  # warm-up
                    runs[mode] = closed_loop(f"{base}/answer", asked, args.clients, args.timeout)
            (mixed, mixed_wall), (grouped, grouped_wall) = runs["mixed"], runs["one at a time"]
            same = sum(m[1] == g[1] and m[2] is None for m, g in zip(mixed, grouped))
            first = [n for n, b in enumerate(asked) if b["model"] == "a0"]
            rows.append({**summary(f"{k} adapters, mixed", mixed, mixed_wall), "same": f"{same}/{len(asked)}",
                         "a0_as_merged": f"{sum(mixed[n][1] == merged[n][1] for n in first)}/{len(first)}"})
            rows.append({**summary(f"{k} adapters, one at a time", grouped, grouped_wall), "same": "-"})
        report = {"requests": len(bodies), "passages": len(passages), "clients": args.clients, "rows": rows}
        print(json.dumps(report, indent=2))
        merged_rate = rows[0]["requests_per_s"]
        print("\n| server | requests/s | x merged | x one adapter at a time | p50 s | p95 s | errors | same answers |\n"
              "|---|---:|---:|---:|---:|---:|---:|---|")
        for r in rows:
            grouped_rate = next((g["requests_per_s"] for g in rows if g["mode"] == r["mode"].replace("mixed",
                                                                                                      "one at a time")),
                                None)
            vs_grouped = f"{r['requests_per_s'] / grouped_rate:.2f}" if "mixed" in r["mode"] and grouped_rate else "-"
            print(f"| {r['mode']} | {r['requests_per_s']} | {r['requests_per_s'] / merged_rate:.2f} | {vs_grouped} | "
                  f"{r['p50_s']} | {r['p95_s']} | {r['errors']} | {r['same']}"
                  + (f" (a0 as merged: {r['a0_as_merged']})" if "a0_as_merged" in r else "") + " |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_soak(args, bodies: list[dict], deadline: float) -> None:
    """The soak with adapters: clients spread over K, an extra one loaded and unloaded every --reload s."""
    k = int(args.adapters.split(",")[0])
    folder = Path(tempfile.mkdtemp(prefix="loraqa-adapters-"))
    os.environ["LORAQA_ADMIN_KEY"] = ADMIN_KEY  # the server reads it
    try:
        adapters = make_adapters(args.adapter, k + 1, folder)
        named = [x for i in range(k) for x in ("--adapter", f"a{i}={adapters[i]}")] + ["--adapter-root", str(folder)]
        passages = list(dict.fromkeys(b["context"] for b in bodies))
        asked = [{**b, "model": f"a{passages.index(b['context']) % k}"} for b in bodies]
        reloads, stop = [], threading.Event()
        with start_server(args, named, deadline) as base:
            def reload() -> None:
                while not stop.wait(args.reload):
                    for route, body in (("load", {"lora_name": "extra", "lora_path": adapters[k]}),
                                        ("unload", {"lora_name": "extra"})):
                        req = urllib.request.Request(f"{base}/v1/{route}_lora_adapter", data=json.dumps(body).encode(),
                                                     headers={"Content-Type": "application/json",
                                                              "Authorization": f"Bearer {ADMIN_KEY}"})
                        start = time.perf_counter()
                        try:
                            with urllib.request.urlopen(req, timeout=args.timeout) as r:
                                reloads.append((route, r.status, round(time.perf_counter() - start, 3)))
                        except OSError as e:
                            reloads.append((route, str(e), round(time.perf_counter() - start, 3)))

            thread = threading.Thread(target=reload, daemon=True)
            thread.start()
            report = soak(f"{base}/answer", asked, args.server_pid, args)
            stop.set()
            thread.join(args.timeout)
            report.update({"adapters": k, "reload_every_s": args.reload, "reloads": reloads,
                           "reload_failures": sum(r[1] != 200 for r in reloads)})
            print(json.dumps(report), flush=True)
            print(f"server after the soak: {wait_healthy(base, None, deadline)}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
