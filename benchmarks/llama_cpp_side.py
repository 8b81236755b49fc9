"""loraqa and llama.cpp side by side on the same CPU and questions: questions/s, and how many answers
equal loraqa's fp32 ones.

    pip install llama-cpp-python      # builds llama.cpp from source: ~15 minutes on 2 cores
    python benchmarks/llama_cpp_side.py --model $(../shared/tools/get-smollm2) --adapter RUN/adapter \\
        --eval-file ../shared/data/squad/proxy-dev-v1.1.json --questions 96 --workdir /tmp/llama-side

The adapter is exported merged with ``loraqa export`` (f16 and q8_0), then each file answers the
questions in llama.cpp (llama-cpp-python), one at a time in file order (a passage's questions in a
row: llama.cpp reuses the prompt's cached prefix, the passage, from one question to the next),
greedy, stopped at a newline, ``--threads`` threads; the binding has no parallel slots (llama-server
has). loraqa answers the same questions with ``loraqa evaluate``'s decoder in its default precision
and in fp32 and bf16. Each llama.cpp run is a process of its own: this project's build once crashed
on the AMX path for q8_0 files, and ``--no-extra-bufts`` runs those on the AVX-512 VNNI kernels.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def llama_cpp_run(path: Path, questions: Path, threads: int, max_new_tokens: int, extra_bufts: bool) -> dict:
    """In this process (``--one FILE``): answer the questions with llama.cpp; print JSON."""
    import llama_cpp.llama_cpp as low
    from llama_cpp import Llama

    from loraqa.data.prompt import cut_answer

    rows = json.loads(questions.read_text())
    if not extra_bufts:  # the binding's constructor takes no such argument: llama.cpp's model parameters do
        defaults = low.llama_model_default_params

        def without_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False
            return params

        low.llama_model_default_params = without_extra_bufts
    llm = Llama(str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm(rows[0]["prompt"], max_tokens=1, temperature=0.0, top_k=1)  # warm-up
    start, answers = time.perf_counter(), {}
    for row in rows:
        out = llm(row["prompt"], max_tokens=max_new_tokens, temperature=0.0, top_k=1, stop=["\n"])
        answers[row["id"]] = cut_answer(out["choices"][0]["text"])
    return {"seconds": time.perf_counter() - start, "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--adapter")
    parser.add_argument("--eval-file")
    parser.add_argument("--questions", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/llama-side")
    parser.add_argument("--outtypes", default="f16,q8_0")
    parser.add_argument("--no-extra-bufts", action="store_true", help="llama.cpp: no AMX buffer types (see above)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one llama.cpp run
    args = parser.parse_args()
    work = Path(args.workdir)
    if args.one:
        print(json.dumps(llama_cpp_run(Path(args.one), work / "questions.json", args.threads, args.max_new_tokens,
                                       not args.no_extra_bufts)))
        return
    if not (args.model and args.adapter and args.eval_file):
        parser.error("--model, --adapter and --eval-file are needed")

    import torch

    from loraqa.config import load_config
    from loraqa.data.load import load_file
    from loraqa.data.prompt import prompt_of
    from loraqa.inference.answerer import load_answerer

    torch.set_num_threads(args.threads)
    work.mkdir(parents=True, exist_ok=True)
    examples = load_file(args.eval_file, "validation")[:args.questions]
    config = load_config(None, {"model": args.model, "max_new_tokens": args.max_new_tokens})
    rows = []
    answers = {}
    for precision in ("auto", "fp32", "bf16"):
        answerer = load_answerer(load_config(None, {**config.to_dict(), "precision": precision}), args.adapter,
                                 examples)
        features, _ = answerer.features(examples)
        contexts = {ex.id: ex.context for ex in examples}
        answerer.decode(features[:8], contexts)  # warm-up
        start = time.perf_counter()
        got = answerer.decode(features, contexts)
        seconds = time.perf_counter() - start
        answers[precision] = got
        rows.append({"engine": f"loraqa, --precision {precision} ({answerer.precision})", "seconds": seconds})
    template = config.template
    (work / "questions.json").write_text(json.dumps([{"id": ex.id, "prompt": prompt_of(ex, template)}
                                                     for ex in examples]))
    for outtype in args.outtypes.split(","):
        path = work / f"model-{outtype}.gguf"
        if not path.is_file():
            subprocess.run([sys.executable, "-m", "loraqa.cli", "export", "--model", args.model, "--adapter",
                            args.adapter, "--output", str(path), "--outtype", outtype, "--quiet"], check=True,
                           stdout=subprocess.DEVNULL)
        command = [sys.executable, __file__, "--one", str(path), "--workdir", str(work), "--threads",
                   str(args.threads), "--max-new-tokens", str(args.max_new_tokens)]
        for extra in ([] if args.no_extra_bufts else [[]]) + ([["--no-extra-bufts"]] if outtype.startswith("q") else []):
            done = subprocess.run(command + extra, capture_output=True, text=True, timeout=3600)
            name = f"llama.cpp {outtype}" + (" (no AMX buffers)" if extra else "")
            if done.returncode != 0:
                rows.append({"engine": name, "failed": f"exit code {done.returncode}: "
                                                       f"{(done.stderr.strip().splitlines() or [''])[-1][:200]}"})
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            answers[name] = result["answers"]
            rows.append({"engine": name, "seconds": result["seconds"]})
    reference = answers["fp32"]
    print(f"\n{len(examples)} questions ({len({ex.context for ex in examples})} passages), {cpu_name()}, "
          f"{args.threads} threads, max {args.max_new_tokens} new tokens\n")
    print("| engine | questions/s | answers equal to loraqa fp32's |\n|---|---:|---:|")
    for row in rows:
        if "failed" in row:
            print(f"| {row['engine']} | failed: {row['failed']} | - |")
            continue
        got = answers.get(row["engine"]) or answers[row["engine"].split("--precision ")[1].split(" ")[0]]
        same = sum(got.get(ex.id) == reference[ex.id] for ex in examples)
        print(f"| {row['engine']} | {len(examples) / row['seconds']:.2f} | {same}/{len(examples)} |")


if __name__ == "__main__":
    main()
