"""Run folders -> ``report.md`` and PNG plots. Reads plain files only; no torch import.

    loss.png   every run on one chart: train loss along the optimizer steps (solid; per epoch
               for runs without steps.jsonl) and eval loss at each epoch's end (squares)
    bars.png   EM / F1, peak memory, and train + eval time, run by run
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from loraqa.io import read_jsonl, write_text_atomic


def load_run(folder: str | Path) -> dict:
    """A run folder's config, metrics and history; errors name the folder and the missing file."""
    folder = Path(folder)
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        raise ValueError(f"{folder}: no metrics.json (not a finished loraqa run folder)")
    config_path = folder / "config.yaml"
    return {
        "name": folder.name,
        "folder": str(folder),
        "config": yaml.safe_load(config_path.read_text()) if config_path.is_file() else {},
        "metrics": json.loads(metrics_path.read_text()),
        "history": read_jsonl(folder / "history.jsonl"),
        "steps": read_jsonl(folder / "steps.jsonl"),
    }


def _fmt(value, spec: str = ",.0f", missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def summary_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for run in runs:
        m = run["metrics"]
        rows.append({
            "run": run["name"], "method": m.get("method", "?"), "lr": run["config"].get("lr"),
            "trainable_params": m.get("trainable_params", 0), "total_params": m.get("total_params"),
            "trainable_percent": m.get("trainable_percent", 0.0), "peak_memory_mb": m.get("peak_memory_mb"),
            "train_seconds": m.get("train_seconds"), "eval_seconds": m.get("eval_seconds"),
            "train_tokens_per_second": m.get("train_tokens_per_second"),
            "exact_match": m["exact_match"], "f1": m["f1"], "n_questions": m["n_questions"],
            "final_train_loss": run["history"][-1]["train_loss"] if run["history"] else None,
            "final_eval_loss": run["history"][-1]["eval_loss"] if run["history"] else None,
        })
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| run | method | lr | trainable params | share | peak memory (MB) | train time (s) | eval time (s) "
            "| train tokens/s | final train / eval loss | EM | F1 | questions |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        losses = f"{_fmt(r['final_train_loss'], '.3f')} / {_fmt(r['final_eval_loss'], '.3f')}"
        lines.append(
            f"| {r['run']} | {r['method']} | {'–' if r['method'] == 'zero-shot' else _fmt(r['lr'], 'g')} "
            f"| {_fmt(r['trainable_params'])} | {r['trainable_percent']:.2f}% "
            f"| {_fmt(r['peak_memory_mb'])} | {_fmt(r['train_seconds'])} | {_fmt(r['eval_seconds'])} "
            f"| {_fmt(r['train_tokens_per_second'])} | {losses} | {r['exact_match']:.2f} | {r['f1']:.2f} "
            f"| {r['n_questions']:,} |")
    return "\n".join(lines)


def analysis_table(runs: list[dict], key: str, title: str) -> str:
    """F1 (n) per bucket of ``metrics['analysis'][key]``, one column per run."""
    runs = [r for r in runs if "analysis" in r["metrics"]]
    if not runs:
        return ""
    buckets = list(dict.fromkeys(b for r in runs for b in r["metrics"]["analysis"][key]))
    lines = [f"| {title} | " + " | ".join(r["name"] for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for b in buckets:
        cells = []
        for r in runs:
            cell = r["metrics"]["analysis"][key].get(b)
            cells.append(f"{cell['f1']:.1f} ({cell['n']})" if cell else "–")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[dict], output_dir: Path) -> list[str]:
    """Write loss.png and bars.png; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    trained = [r for r in runs if r["history"]]
    if trained:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, r in enumerate(trained):
            color = f"C{i}"
            if r["steps"]:
                ends = {}  # epoch -> its last optimizer step
                for p in r["steps"]:
                    ends[p["epoch"]] = p["step"]
                ax.plot([p["step"] for p in r["steps"]], [p["train_loss"] for p in r["steps"]], "-", color=color,
                        label=f"{r['name']} train")
                x_eval = [ends.get(h["epoch"], h["epoch"]) for h in r["history"]]
            else:
                x_eval = [h["epoch"] for h in r["history"]]
                ax.plot(x_eval, [h["train_loss"] for h in r["history"]], "-o", color=color, label=f"{r['name']} train")
            scored = [(x, h["eval_loss"]) for x, h in zip(x_eval, r["history"]) if h["eval_loss"] is not None]
            if scored:  # --eval-loss-examples 0 skips it
                ax.plot(*zip(*scored), "--s", color=color, label=f"{r['name']} eval")
        ax.set_xlabel("optimizer step" if any(r["steps"] for r in trained) else "epoch")
        ax.set_ylabel("answer loss (nats/token)")
        ax.legend(fontsize=8)
        ax.set_title("Training and evaluation loss")
        fig.tight_layout()
        fig.savefig(output_dir / "loss.png", dpi=120)
        plt.close(fig)
        written.append("loss.png")
    rows = summary_rows(runs)
    names = [r["run"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    x = range(len(rows))
    axes[0].bar([i - 0.2 for i in x], [r["exact_match"] for r in rows], width=0.4, label="EM")
    axes[0].bar([i + 0.2 for i in x], [r["f1"] for r in rows], width=0.4, label="F1")
    axes[0].set_title("Exact match / F1")
    axes[0].legend()
    axes[1].bar(x, [r["peak_memory_mb"] or 0 for r in rows], color="C2")
    axes[1].set_title("Peak memory (MB)")
    axes[2].bar(x, [r["train_seconds"] or 0 for r in rows], color="C3", label="train")
    axes[2].bar(x, [r["eval_seconds"] or 0 for r in rows], bottom=[r["train_seconds"] or 0 for r in rows],
                color="C4", label="eval")
    axes[2].set_title("Wall time (s)")
    axes[2].legend()
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(output_dir / "bars.png", dpi=120)
    plt.close(fig)
    written.append("bars.png")
    return written


def write_report(run_folders: list[str | Path], output_dir: str | Path) -> Path:
    """report.md (+ plots) for ``run_folders``; returns the report's path."""
    runs = [load_run(f) for f in run_folders]
    if not runs:
        raise ValueError("no run folders given")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    images = plot(runs, output_dir)
    parts = ["# loraqa report", "", markdown_table(summary_rows(runs)), ""]
    parts += [f"![{name}]({name})" for name in images] + [""]
    for key, title in (("by_question_type", "question type"), ("by_answer_words", "gold answer words"),
                       ("by_context_words", "context words")):
        table = analysis_table(runs, key, title)
        if table:
            parts += [f"## F1 (questions) by {title}", "", table, ""]
    for run in runs:
        a = run["metrics"].get("analysis")
        if not a:
            continue
        parts += [f"## {run['name']}: worst questions", "",
                  f"Empty predictions: {100 * a['empty_prediction_share']:.1f}%; predictions not found in the "
                  f"context: {100 * a['not_in_context_share']:.1f}%.", ""]
        for w in a["worst"][:5]:
            parts.append(f"- **{w['question']}** predicted `{w['prediction']}`, gold {w['golds']} "
                         f"(F1 {w['f1']:.0f}) — {w['context']}")
        parts.append("")
    path = output_dir / "report.md"
    write_text_atomic(path, "\n".join(parts))
    return path
