"""One question, cold: ``loraqa ask`` in a new process (the first run ever, with an empty cache, and
the next runs), ``loraqa serve``'s time to ready, and llama.cpp doing the same in a new process on
loraqa's own q8_0 export of the same adapter, where llama-cpp-python is installed.

    python benchmarks/cold_start.py --model $(../shared/tools/get-smollm2) --adapter RUN/adapter \\
        --context-file p.txt --question "..." --runs 3 --workdir /tmp/cold

Each ``ask`` prints where its start went (``[loraqa] start: ...``: imports and input, model read,
adapter, path check and precision); the rest of its wall time is the answer and the process's exit.
``evaluate`` answers the same question from a one-question file, to show the answers are the same.
Times are wall seconds, median of ``--runs`` new processes, nothing else running (run it alone).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

START = re.compile(r"start: ([\d.]+) s \(imports and input ([\d.]+), model ([\d.]+), adapter ([\d.]+), "
                   r"path check and precision ([\d.]+)\)")
LOADING = ("import os, sys\n"
           "from llama_cpp import Llama\n"
           "llm = Llama(sys.argv[1], n_ctx=2048, n_threads=os.cpu_count(), n_threads_batch=os.cpu_count(), "
           "verbose=False)\n"
           "out = llm(open(sys.argv[2]).read(), max_tokens=32, temperature=0.0, top_k=1, stop=['\\n'])\n"
           "print(out['choices'][0]['text'].strip())\n")


def loraqa(*args: str, cache: Path) -> tuple[float, str, str]:
    """(wall seconds, stdout, stderr) of ``loraqa ARGS`` in a new process with ``cache`` as its cache."""
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "loraqa.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "LORAQA_CACHE": str(cache)})
    wall = time.perf_counter() - began
    if done.returncode != 0:
        sys.exit(f"loraqa {args[0]} failed:\n{done.stderr[-2000:]}")
    return wall, done.stdout.strip(), done.stderr


def breakdown(stderr: str) -> dict:
    found = START.search(stderr)
    if not found:
        return {}
    total, imports, model, adapter, check = map(float, found.groups())
    return {"start": total, "imports": imports, "model": model, "adapter": adapter, "check": check}


def serve_ready(common: list[str], cache: Path) -> float:
    """Seconds from a new ``loraqa serve`` process to its first 200 on /health."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    began = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "loraqa.cli", "serve", *common, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "LORAQA_CACHE": str(cache)})
    try:
        deadline = began + 300
        while time.perf_counter() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
                    if reply.status == 200:
                        return time.perf_counter() - began
            except OSError:
                if server.poll() is not None:
                    sys.exit(f"loraqa serve exited:\n{server.stderr.read()[-2000:]}")
                time.sleep(0.05)
        sys.exit("loraqa serve was not ready in 300 s")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def llama_cpp(args, work: Path, prompt: str) -> dict | None:
    """llama.cpp's new-process time (import, load, answer) on loraqa's q8_0 export, or None."""
    if subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True).returncode != 0:
        print("llama.cpp: llama-cpp-python is not installed (pip install llama-cpp-python: builds it, 10-20 min)")
        return None
    exported = work / "merged-q8_0.gguf"
    if not exported.is_file():
        loraqa("export", "--model", args.model, "--adapter", args.adapter, "--outtype", "q8_0", "--output",
               str(exported), cache=work / "cache")
    (work / "prompt.txt").write_text(prompt)
    walls, answer = [], ""
    for _ in range(args.runs):
        began = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", LOADING, str(exported), str(work / "prompt.txt")],
                              capture_output=True, text=True, check=True)
        walls.append(time.perf_counter() - began)
        answer = done.stdout.strip()
    return {"wall": statistics.median(walls), "walls": walls, "answer": answer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--context-file", required=True)
    parser.add_argument("--question", required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/loraqa-cold-start")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    ask = ["ask", "--model", args.model, "--adapter", args.adapter, "--context-file", args.context_file,
           "--question", args.question]

    for old in cache.glob("*"):  # the first run ever: an empty cache
        subprocess.run(["rm", "-rf", str(old)], check=True)
    first_wall, first_answer, first_err = loraqa(*ask, cache=cache)
    runs = [loraqa(*ask, cache=cache) for _ in range(args.runs)]
    walls = [w for w, _, _ in runs]
    parts = [breakdown(err) for _, _, err in runs]
    middle = parts[sorted(range(len(walls)), key=walls.__getitem__)[len(walls) // 2]]  # the median run's
    answers = {first_answer, *(a for _, a, _ in runs)}

    context = Path(args.context_file).read_text(encoding="utf-8")
    one = work / "one.json"  # SQuAD v1.1 with one question (its gold answer is a placeholder: not scored here)
    one.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": "q", "question": args.question, "answers": [{"text": context[:1], "answer_start": 0}]}]}]}]}))
    loraqa("evaluate", "--model", args.model, "--adapter", args.adapter, "--eval-file", str(one), "--output-dir",
           str(work / "evaluate"), cache=cache)
    evaluated = json.loads((work / "evaluate" / "predictions.json").read_text())["q"]

    ready = [serve_ready(["--model", args.model, "--adapter", args.adapter], cache) for _ in range(args.runs)]

    from loraqa.config import DEFAULT_TEMPLATE
    from loraqa.data.examples import Example
    from loraqa.data.prompt import prompt_of

    side = llama_cpp(args, work, prompt_of(Example("q", "", context, args.question, ()), DEFAULT_TEMPLATE))
    result = {"cpu": cpu_name(), "first_run": {"wall": first_wall, **breakdown(first_err)},
              "ask": {"wall": statistics.median(walls), "walls": walls, **middle}, "answers": sorted(answers),
              "evaluate": evaluated, "serve_ready": {"wall": statistics.median(ready), "walls": ready},
              "llama_cpp": side}
    (work / "cold_start.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"CPU: {result['cpu']}")
    print(f"loraqa ask, first run ever (empty cache): {first_wall:.2f} s")
    print(f"loraqa ask, next runs: {statistics.median(walls):.2f} s (median of {args.runs}: "
          f"{', '.join(f'{w:.2f}' for w in walls)})")
    if middle:
        rest = statistics.median(walls) - middle["start"]
        print(f"  imports and input {middle['imports']:.2f}, model {middle['model']:.2f}, adapter {middle['adapter']:.2f}, "
              f"path check and precision {middle['check']:.2f}, answer and exit {rest:.2f}")
    print(f"answers: {sorted(answers)}; loraqa evaluate: {evaluated!r}")
    print(f"loraqa serve, ready: {statistics.median(ready):.2f} s (median of {args.runs})")
    if side:
        print(f"llama.cpp (q8_0 export, new process): {side['wall']:.2f} s; answer {side['answer']!r}; "
              f"loraqa ask / llama.cpp = {statistics.median(walls) / side['wall']:.1f}x")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
