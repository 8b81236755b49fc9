"""Two questions about one whole article through ``loraqa serve`` and the ``openai`` client's chat route
(the article as the system message), timed, beside ``loraqa evaluate --document-level``'s answers
(which answers all the article's questions).

    python benchmarks/document_serve.py --model $(../shared/tools/get-smollm2) --adapter RUN/adapter \\
        --eval-file ../shared/data/squad/proxy-dev-v1.1.json --title Steam_engine --workdir /tmp/docserve

The first question reads its windows (BM25's first, ``inference.documents``); the server then reads
the article's other windows while idle (``--read-ahead``), so the second question, about another
part of the article, prefills only its own tokens. The script waits for the read-ahead to end
(``loraqa_document_read_ahead_waiting`` in ``/metrics``) before the second question, and says how
long it took. The questions: the article's first and last in file order (``--questions`` picks others).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")), float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--eval-file", required=True)
    parser.add_argument("--title", default="Steam_engine")
    parser.add_argument("--questions", type=int, nargs=2, default=[0, -1], help="the two questions' indices")
    parser.add_argument("--workdir", default="/tmp/loraqa-document-serve")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    data = json.loads(Path(args.eval_file).read_text())
    article = next(a for a in data["data"] if a["title"] == args.title)
    qas = [q for p in article["paragraphs"] for q in p["qas"]]
    picked = {qas[i]["id"] for i in args.questions}
    # the article with all its questions: --document-level joins the paragraphs its questions are about
    (work / "article.json").write_text(json.dumps({"version": data.get("version", "1.1"), "data": [article]}))
    document = "\n\n".join(p["context"] for p in article["paragraphs"])  # as --document-level joins them
    questions = [q for q in qas if q["id"] in picked]
    print(f"{args.title}: {len(document.split()):,} words; questions {[q['question'] for q in questions]}")

    subprocess.run([sys.executable, "-m", "loraqa.cli", "evaluate", "--model", args.model, "--adapter", args.adapter,
                    "--eval-file", str(work / "article.json"), "--document-level", "--output-dir",
                    str(work / "evaluate")], check=True, capture_output=True)
    evaluated = json.loads((work / "evaluate" / "predictions.json").read_text())

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "loraqa.cli", "serve", "--model", args.model, "--adapter",
                               args.adapter, "--port", str(port)], stderr=open(work / "serve.log", "w"))
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        from openai import OpenAI

        client = OpenAI(base_url=f"{url}/v1", api_key="none")
        model = client.models.list().data[0].id  # the base (with --adapter merged)
        rows = []
        for n, q in enumerate(questions):
            if n:  # the first question's read-ahead, to its end
                began = time.perf_counter()
                while metric(url, "loraqa_document_read_ahead_waiting") > 0:
                    time.sleep(0.1)
                print(f"read-ahead of the article's other windows: {time.perf_counter() - began:.1f} s after the first "
                      f"answer; {metric(url, 'loraqa_document_cache_windows'):.0f} windows kept")
            misses = metric(url, "loraqa_document_cache_misses_total")
            began = time.perf_counter()
            reply = client.chat.completions.create(model=model, temperature=0, messages=[
                {"role": "system", "content": document}, {"role": "user", "content": q["question"]}])
            seconds = time.perf_counter() - began
            answer = reply.choices[0].message.content or ""
            rows.append({"question": q["question"], "seconds": seconds, "answer": answer,
                         "evaluate": evaluated[q["id"]], "same": answer == evaluated[q["id"]],
                         "windows_prefilled": metric(url, "loraqa_document_cache_misses_total") - misses})
            print(f"question {n + 1}: {seconds:.2f} s, {rows[-1]['windows_prefilled']:.0f} windows prefilled; answer "
                  f"{answer!r}; evaluate --document-level {evaluated[q['id']]!r}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    ratio = rows[0]["seconds"] / rows[1]["seconds"]
    print(f"second question {ratio:.1f}x faster than the first; answers equal to evaluate's: "
          f"{sum(r['same'] for r in rows)} of {len(rows)}")
    (work / "document_serve.json").write_text(json.dumps({"rows": rows, "ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
