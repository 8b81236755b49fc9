"""Does the exported GGUF file answer as loraqa does? loraqa (base + adapter) against the files that
`loraqa export` writes, read back by transformers (loraqa's own `--model FILE.gguf`) and run by
llama.cpp (llama-cpp-python), on the same questions, greedy, with the run's prompt template.

    pip install llama-cpp-python      # builds llama.cpp from source: ~15 minutes on 2 cores
    python benchmarks/gguf_check.py --model $(../shared/tools/get-smollm2) --adapter RUN/adapter \
        --eval-file ../shared/data/squad/proxy-dev-v1.1.json --questions 24 --workdir /tmp/gguf-check

Without llama-cpp-python the llama.cpp rows are left out, saying so.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HARD = ["Hello world", " leading space", "  two spaces", "digits 1234567 3.14 2024-11-30", "unicode: café naïve 東京 🚀",
        "new\nlines\n\n  indented\n", "tabs\tand\r\nreturns", "Context: x\nQuestion: y?\nAnswer:"]


def export(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "loraqa.cli", "export", "--quiet", *argv], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def llama_cpp_answers(model: Path, examples, template: str, max_new_tokens: int, lora: Path | None = None):
    from llama_cpp import Llama

    from loraqa.data.prompt import cut_answer, prompt_of

    llm = Llama(str(model), n_ctx=2048, verbose=False, n_threads=2, lora_path=str(lora) if lora else None)
    answers = {}
    for ex in examples:  # greedy: temperature 0, top_k 1; one line, as loraqa stops at a newline
        out = llm(prompt_of(ex, template), max_tokens=max_new_tokens, temperature=0.0, top_k=1, stop=["\n"])
        answers[ex.id] = cut_answer(out["choices"][0]["text"])
    llm.close()
    return answers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--eval-file", required=True)
    p.add_argument("--questions", type=int, default=24)
    p.add_argument("--workdir", default="/tmp/loraqa-gguf-check")
    args = p.parse_args()

    from loraqa.config import load_config
    from loraqa.data.load import load_examples
    from loraqa.inference.answerer import ask
    from loraqa.model.load import load_tokenizer
    from loraqa.model.lora import adapter_settings

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    examples = load_examples(args.eval_file, "validation", args.questions)
    config = load_config(None, {**adapter_settings(args.adapter), "model": args.model, "precision": "fp32"})
    files = {"f32": work / "merged-f32.gguf", "q8_0": work / "merged-q8_0.gguf", "base": work / "base-f32.gguf",
             "lora": work / "adapter.gguf"}
    seconds = {
        "f32": export(["--model", args.model, "--adapter", args.adapter, "--outtype", "f32", "--output", str(files["f32"])]),
        "q8_0": export(["--model", args.model, "--adapter", args.adapter, "--outtype", "q8_0", "--output", str(files["q8_0"])]),
        "base": export(["--model", args.model, "--outtype", "f32", "--output", str(files["base"])]),
        "lora": export(["--model", args.model, "--adapter", args.adapter, "--adapter-only", "--output", str(files["lora"]),
                        "--base-gguf", str(files["base"])]),
    }
    for name, path in files.items():
        print(f"exported {name:5s} {path.stat().st_size / 2 ** 20:7.1f} MiB in {seconds[name]:5.1f} s: {path}")

    reference = ask(config, args.adapter, examples)  # loraqa: base + adapter, fp32
    rows = {}
    for name in ("f32", "q8_0"):  # read back through transformers, answered by loraqa
        rows[f"transformers reads {name}"] = ask(load_config(None, {**config.to_dict(), "model": str(files[name])}),
                                                 None, examples)
    original = load_tokenizer(args.model)
    back = load_tokenizer(str(files["f32"]))
    same_ids = sum(back(t)["input_ids"] == original(t)["input_ids"] for t in HARD)
    print(f"tokenizer read back by transformers: {same_ids}/{len(HARD)} hard strings give the same ids")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: the llama.cpp rows are left out")
    else:
        from llama_cpp import Llama
        llm = Llama(str(files["f32"]), n_ctx=256, verbose=False, vocab_only=True)
        same = sum(llm.tokenize(t.encode(), add_bos=True, special=True) == original(t)["input_ids"] for t in HARD)
        llm.close()
        print(f"tokenizer in llama.cpp: {same}/{len(HARD)} hard strings give transformers' ids")
        for name in ("f32", "q8_0"):
            rows[f"llama.cpp runs {name}"] = llama_cpp_answers(files[name], examples, config.template,
                                                                  config.max_new_tokens)
        rows["llama.cpp base f32 + adapter.gguf"] = llama_cpp_answers(files["base"], examples, config.template,
                                                                         config.max_new_tokens, files["lora"])
    print(f"\n{len(examples)} questions of {args.eval_file}; reference: loraqa, {args.model} + {args.adapter}, fp32")
    print(f"{'answered by':36s} {'same as loraqa':>15s}")
    for name, answers in rows.items():
        same = sum(answers[ex.id] == reference[ex.id] for ex in examples)
        print(f"{name:36s} {same:>8d} / {len(examples)}")
    if "llama.cpp runs f32" in rows:
        merged, lora = rows["llama.cpp runs f32"], rows["llama.cpp base f32 + adapter.gguf"]
        print(f"llama.cpp: adapter.gguf on the base gives the merged file's answers on "
              f"{sum(merged[ex.id] == lora[ex.id] for ex in examples)} / {len(examples)}")
    differ = [ex for ex in examples if any(a[ex.id] != reference[ex.id] for a in rows.values())]
    for ex in differ[:8]:
        print(f"  {ex.id}: loraqa {reference[ex.id]!r}; " + "; ".join(f"{n}: {a[ex.id]!r}" for n, a in rows.items()
                                                                    if a[ex.id] != reference[ex.id]))


if __name__ == "__main__":
    main()
