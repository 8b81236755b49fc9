"""SQuAD-document beside SQuAD: one adapter scored with each question asked about its paragraph, and
with each question asked about its whole article (its paragraphs joined, ``--document-level``),
EM/F1 and questions/s of each, in one table. Each row is ``loraqa evaluate`` in a process of its own.

    G=$(../shared/tools/get-smollm2); D=../shared/data/squad
    python benchmarks/documents.py --model $G --adapter runs/doc500/adapter --eval-file $D/proxy-dev-v1.1.json

``--eval-examples N`` scores the first N questions (quick looks); without it, all. ``--set
key=value`` passes a setting to both rows (``--set windows_per_question=5``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def evaluate(args, document_level: bool, out: Path) -> dict:
    """``loraqa evaluate`` in a process of its own; its metrics.json (reused when already there)."""
    if not (out / "metrics.json").is_file():
        command = [sys.executable, "-m", "loraqa.cli", "evaluate", "--model", args.model, "--eval-file", args.eval_file,
                   "--output-dir", str(out), "--quiet"]
        command += ["--adapter", args.adapter] if args.adapter else []
        command += ["--max-eval-examples", str(args.eval_examples)] if args.eval_examples else []
        command += ["--document-level"] if document_level else []
        for setting in args.set:
            key, _, value = setting.partition("=")
            command += [f"--{key.replace('_', '-')}", value]
        subprocess.run(command, check=True)
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--adapter")
    parser.add_argument("--eval-file", required=True)
    parser.add_argument("--eval-examples", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output-dir", default="runs/documents-benchmark")
    args = parser.parse_args()
    rows = []
    for name, whole in (("paragraph", False), ("document", True)):
        m = evaluate(args, whole, Path(args.output_dir) / name)
        rows.append((name, m))
    print("| passage given with each question | questions | EM | F1 | questions/s | read in windows |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, m in rows:
        windows = (f"{m.get('documents_in_windows', 0)} passages, {m.get('windows', 0)} windows, "
                   f"{m.get('window_questions', 0)} question-windows")
        print(f"| {name} | {m['n_questions']} | {m['exact_match']:.2f} | {m['f1']:.2f} | "
              f"{m['eval_questions_per_second']:.2f} | {windows} |")
    (paragraph, p), (_, d) = rows
    print(f"document-level F1 {d['f1'] - p['f1']:+.2f} against paragraph-level; questions/s "
          f"{d['eval_questions_per_second'] / p['eval_questions_per_second']:.2f}x")


if __name__ == "__main__":
    main()
