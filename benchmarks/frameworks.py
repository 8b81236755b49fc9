"""LangChain, LlamaIndex and Haystack's default question-answering chains against ``loraqa serve``, beside
its own ``POST /answer``, on the same questions (each with its own paragraph): EM and F1 as SQuAD's
official script scores them, and how many answers equal ``/answer``'s.

    pip install -e '.[frameworks]'
    python benchmarks/frameworks.py --model $(../shared/tools/get-smollm2) --adapter RUN/adapter \\
        --eval-file ../shared/data/squad/proxy-dev-v1.1.json --questions 200

The chains are ``examples/chains.py``'s (each framework's documented default prompt). One server,
the questions asked one after another by each client in turn.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from chains import CHAINS  # noqa: E402 - examples/ is not a package

CLIENTS = ["langchain-rag", "langchain-stuff", "llama-index", "haystack", "haystack-get-started"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter")
    parser.add_argument("--eval-file", required=True)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--output", default="/tmp/loraqa-frameworks.json")
    args = parser.parse_args()

    from loraqa.data.squad import load_squad_file
    from loraqa.scoring.squad_v1 import squad_scores

    examples = load_squad_file(args.eval_file)[:args.questions]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "loraqa.cli", "serve", "--model", args.model, "--port", str(port)]
    server = subprocess.Popen(command + (["--adapter", args.adapter] if args.adapter else []),
                              stderr=open(Path(args.output).with_suffix(".log"), "w"))
    answers: dict[str, dict[str, str]] = {name: {} for name in ["/answer", *CLIENTS]}
    try:
        for _ in range(600):
            try:
                model = json.load(urllib.request.urlopen(f"{url}/v1/models", timeout=1))["data"][0]["id"]
                break
            except OSError:
                time.sleep(0.5)
        began = time.perf_counter()
        for n, ex in enumerate(examples):
            body = json.dumps({"context": ex.context, "question": ex.question}).encode()
            reply = urllib.request.urlopen(urllib.request.Request(f"{url}/answer", body,
                                                                  {"Content-Type": "application/json"}))
            answers["/answer"][ex.id] = json.load(reply)["answer"]
            for name in CLIENTS:
                answers[name][ex.id] = (CHAINS[name][0](f"{url}/v1", model, [ex.context], ex.question) or "").strip()
            if (n + 1) % 50 == 0:
                print(f"{n + 1} questions, {time.perf_counter() - began:.0f} s", file=sys.stderr)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    def score(predictions: dict[str, str]) -> tuple[float, float]:
        scores = squad_scores({ex.id: ex.answers for ex in examples}, predictions)
        return scores["exact_match"], scores["f1"]

    base_em, base_f1 = score(answers["/answer"])
    rows = []
    print(f"| client | version | EM | F1 | F1 - /answer's | answers equal to /answer's |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    print(f"| POST /answer | loraqa | {base_em:.2f} | {base_f1:.2f} | | |")
    for name in CLIENTS:
        em, f1 = score(answers[name])
        same = sum(answers[name][i] == answers["/answer"][i] for i in answers["/answer"])
        package = CHAINS[name][1]
        rows.append({"client": name, "package": package, "version": version(package), "em": em, "f1": f1, "same": same})
        print(f"| {name} | {package} {version(package)} | {em:.2f} | {f1:.2f} | {f1 - base_f1:+.2f} | "
              f"{same}/{len(examples)} |")
    Path(args.output).write_text(json.dumps({"answer": {"em": base_em, "f1": base_f1}, "clients": rows,
                                             "answers": answers}, indent=2) + "\n")


if __name__ == "__main__":
    main()
