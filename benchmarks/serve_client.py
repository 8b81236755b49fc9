"""What benchmarks/serve.py and benchmarks/serve_adapters.py share: starting a `loraqa serve` process
and waiting for it, posting requests and timing them, closed loops, a soak's memory, summaries."""

from __future__ import annotations

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
