"""loraqa: fine-tune a causal language model with LoRA to answer questions from a passage, and
score it the way SQuAD's official script does.

examples:
  loraqa quickstart                     # no hub needed; 8-20 minutes on 2 CPU cores
  loraqa train --config recommended --model HuggingFaceTB/SmolLM2-135M-Instruct --train-file train.jsonl --eval-file dev.csv --output-dir runs/mine
  loraqa ask --model M --adapter runs/mine/adapter --context "..." --question "..."
  loraqa serve --model M --adapter runs/mine/adapter    # POST /answer, and a page at http://127.0.0.1:8000
  loraqa export --model M --adapter runs/mine/adapter --output mine.gguf   # for llama.cpp and Ollama

Settings: a preset (--config recommended; `loraqa train --help` names them all) or a YAML file, then
flags. `loraqa COMMAND --help` lists a command's flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from loraqa.config import Config, fields, load_config, presets
from loraqa.model.fetch import SMOLLM2
from loraqa.runtime import keep_freed_memory, run_under_jemalloc

TRAIN_FLAGS = list(fields())
EVAL_FLAGS = ["model", "init", "tokenizer", "allow_other_weights", "eval_file", "dataset", "columns", "allow_unanswerable",
              "no_answer_text", "method", "doc_stride", "max_eval_examples", "template", "max_length",
              "eval_batch_size", "eval_batch_tokens", "max_new_tokens", "draft_tokens", "constrain_to_context",
              "na_prob_thresh", "precision", "seed", "output_dir", "window_tokens", "windows_per_question",
              "document_level"]
ASK_FLAGS = ["model", "init", "tokenizer", "allow_other_weights", "template", "max_length", "no_answer_text", "method", "doc_stride",
             "allow_unanswerable", "eval_batch_size", "eval_batch_tokens", "max_new_tokens", "draft_tokens",
             "constrain_to_context", "na_prob_thresh", "precision", "seed", "window_tokens", "windows_per_question"]
MERGE_FLAGS = ["model", "init", "tokenizer", "allow_other_weights", "method", "seed"]
EXPORT_FLAGS = ["model", "init", "tokenizer", "allow_other_weights", "method", "template", "max_new_tokens", "seed"]
PARAMS_FLAGS = ["model", "init", "seed", "method", "r", "lora_alpha", "lora_dropout", "target_modules"]


def _add_config_flags(parser: argparse.ArgumentParser, names: list[str], command: str) -> None:
    """One flag per Config field; defaults are suppressed so only given flags override."""
    all_fields = fields()
    for name in names:
        f = all_fields[name]
        kind = str(f.type)
        flags = [f"--{name.replace('_', '-')}"]
        if kind == "bool":  # --use-rslora / --no-use-rslora
            parser.add_argument(*flags, dest=name, default=argparse.SUPPRESS, help=f.metadata["help"],
                                action=argparse.BooleanOptionalAction)
            continue
        parser.add_argument(*flags, dest=name, default=argparse.SUPPRESS, help=f.metadata["help"],
                            type=int if kind.startswith("int") else float if kind.startswith("float") else str,
                            choices=f.metadata.get("choices"))
    if command in ("evaluate", "ask"):  # the older name of --eval-batch-size there, still taken
        parser.add_argument("--batch-size", dest="batch_size_alias", type=int, default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)
    parser.add_argument("--config", help=f"a preset's name ({', '.join(presets())}) or a YAML file; flags override it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraqa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("quickstart", help="fine-tune SmolLM2 on the bundled SQuAD sample; scores before and after")
    p.add_argument("--output-dir", default="runs/quickstart", help="folder for the two run folders and the report")
    p.add_argument("--model", default=SMOLLM2, help="hub name, folder or .gguf file (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("train", help="fine-tune, evaluate, write a run folder")
    _add_config_flags(p, TRAIN_FLAGS, "train")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("evaluate", help="generate answers and score them")
    _add_config_flags(p, EVAL_FLAGS, "evaluate")
    p.add_argument("--adapter", help="PEFT adapter folder (a run's adapter/) to apply to --model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("score", help="EM/F1 of a predictions file, as evaluate-v1.1.py (v2.0 data: evaluate-v2.0.py)")
    p.add_argument("data_file", help="the questions with their gold answers (SQuAD JSON, .jsonl, .csv, .parquet, ...)")
    p.add_argument("predictions_file", help="JSON object {question id: answer}")
    p.add_argument("--na-prob-file", help="v2.0: JSON object {question id: probability of no answer}")
    p.add_argument("--na-prob-thresh", type=float, default=1.0,
                   help="v2.0: predict no answer above this probability (default: %(default)s)")
    p = sub.add_parser("params", help="trainable / total parameters")
    _add_config_flags(p, PARAMS_FLAGS, "params")
    p = sub.add_parser("compare", help="zero-shot vs LoRA vs full fine-tuning on the same data, with a report")
    _add_config_flags(p, TRAIN_FLAGS, "compare")
    p.add_argument("--methods", default="zero-shot,lora,full",
                   help="comma-separated rows: zero-shot, lora, full, span (LoRA with an extractive span head)")
    p.add_argument("--extra", action="append", default=[], metavar="NAME:KEY=VALUE[;KEY=VALUE]",
                   help="an extra LoRA row, e.g. 'lora-r32:r=32;lora_alpha=64' (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("report", help="report.md and plots from run folders (no torch needed)")
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--output-dir", required=True, help="where report.md and the PNGs go")
    p = sub.add_parser("merge", help="merge an adapter into its base model and save a plain model")
    _add_config_flags(p, MERGE_FLAGS, "merge")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder")
    p.add_argument("--output-dir", required=True, help="folder for the merged model")
    p = sub.add_parser("export", help="a model (+ adapter, merged) as one GGUF file for llama.cpp and Ollama")
    _add_config_flags(p, EXPORT_FLAGS, "export")
    p.add_argument("--adapter", help="PEFT adapter folder, merged into --model (or alone with --adapter-only)")
    p.add_argument("--output", required=True, help="the .gguf file to write; an Ollama Modelfile goes beside it")
    p.add_argument("--outtype", default="f16", choices=["f32", "f16", "q8_0"], help="weight type (default f16)")
    p.add_argument("--adapter-only", action="store_true",
                   help="write the LoRA alone as a GGUF adapter (llama-cli --lora, Ollama ADAPTER)")
    p.add_argument("--base-gguf", help="with --adapter-only: the base model's GGUF file, for the Modelfile's FROM "
                                       "(default: --model when it is a .gguf file)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_ask(sub)
    _add_serve(sub)
    _add_cache(sub)
    return parser


def _add_ask(sub) -> None:
    p = sub.add_parser("ask", help="answer questions with a model (+ adapter)")
    _add_config_flags(p, ASK_FLAGS, "ask")
    p.add_argument("--adapter", help="PEFT adapter folder to apply to --model")
    context = p.add_mutually_exclusive_group()
    context.add_argument("--context", help="the passage to answer from")
    context.add_argument("--context-file", help="a text file holding the passage")
    context.add_argument("--document", help="a document to answer from, of any length: text, Markdown, HTML or PDF "
                                            "(pip install 'loraqa[documents]'); read in windows, each answer with "
                                            "where it came from")
    p.add_argument("--question", help="the question (with --context, --context-file or --document)")
    p.add_argument("--input", help="JSONL of {context, question, id?} ({question, id?} with --document); answers go "
                                   "to --output as JSONL")
    p.add_argument("--output", help="JSONL answers file for --input (default: standard output)")


def _add_cache(sub) -> None:
    p = sub.add_parser("cache", help="what loraqa keeps in its cache folder (GGUF files read into model folders, "
                       "path checks), or 'clear' to free it")
    p.add_argument("action", nargs="?", choices=["info", "clear"], default="info")


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="answer questions over HTTP: POST /answer, OpenAI's /v1 API, GET /metrics, "
                                     "/health, a page at /")
    _add_config_flags(p, ASK_FLAGS, "serve")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="a PEFT adapter folder: one PATH alone is merged into --model (the fastest single model); "
                        "NAME=PATH (repeatable) serves each by name, side by side with the base, requests for "
                        "different adapters decoded in one batch")
    p.add_argument("--admin-key-file", help="a file holding the admin key that POST /v1/load_lora_adapter and "
                                            "/v1/unload_lora_adapter need (or set LORAQA_ADMIN_KEY); without one, "
                                            "the adapters are the ones given at start")
    p.add_argument("--adapter-root", help="the folder under which POST /v1/load_lora_adapter may load adapters "
                                          "(a relative lora_path is taken from there); without it, none is loaded")
    p.add_argument("--max-prompt-tokens", type=int, default=2048,
                   help="most tokens one request's prompt may hold (413 over it; default: %(default)s, a prefill of "
                        "seconds on 2 CPU cores)")
    p.add_argument("--max-document-tokens", type=int, default=1 << 17,
                   help="most tokens one passage may hold (413 over it; default: %(default)s); a passage longer than "
                        "a window is read in windows, each within --max-prompt-tokens")
    p.add_argument("--document-cache-mb", type=int, default=1024,
                   help="memory for documents' windows' keys and values kept from one request to the next, least "
                        "recently used out first (default: %(default)s; 0: none)")
    p.add_argument("--read-ahead", action=argparse.BooleanOptionalAction, default=True,
                   help="after a question about a long document, read its other windows while no request waits, "
                        "within --document-cache-mb, so the next question about it reads only its own tokens "
                        "(default: on)")
    p.add_argument("--metrics-need-key", action="store_true",
                   help="GET /metrics needs the API key too (default: open, like /health)")
    p.add_argument("--one-adapter-per-batch", action="store_true",
                   help="decode one adapter's requests at a time, as servers that cannot mix adapters do "
                        "(for comparison: benchmarks/serve.py --adapters)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=32, help="most questions decoded together (default: %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long a request waits for others to share its batch (default: %(default)s)")
    p.add_argument("--api-key-file", help="a file holding the API key that POST /answer and the /v1 routes then "
                                          "need as 'Authorization: Bearer KEY' (or set LORAQA_API_KEY)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name the server answers to besides its address, e.g. the name a reverse proxy "
                        "or your team uses (repeatable; '*' allows any)")
    p.add_argument("--unauthenticated", action="store_true",
                   help="serve anyone who can reach the port: --host other than this machine without an API key")
    p.add_argument("--request-timeout", type=float, default=60.0,
                   help="seconds a request may take before it gets a 504 (default: %(default)s); also how long "
                        "SIGTERM / Ctrl-C waits for the requests in flight")


def _settings(args: argparse.Namespace, names: list[str]) -> dict:
    settings = {k: v for k, v in vars(args).items() if k in names}
    if hasattr(args, "batch_size_alias"):  # evaluate / ask: --batch-size, the older name of --eval-batch-size
        print(f"loraqa {args.command}: --batch-size here is --eval-batch-size (questions decoded together); "
              "the older name still works", file=sys.stderr)
        settings.setdefault("eval_batch_size", args.batch_size_alias)
    return settings


def _config(args: argparse.Namespace, names: list[str]) -> Config:
    """The preset or YAML file, then the settings saved beside ``--adapter`` (so a trained adapter
    is used with the prompts it was trained on), then the flags given."""
    from loraqa.model.lora import adapter_settings

    adapter = getattr(args, "adapter", None)
    if isinstance(adapter, list):  # serve: [NAME=]PATH, repeatable; the first one's prompt settings (all share them)
        first = adapter[0] if adapter else None
        name, named, path = (first or "").partition("=")
        adapter = path if named and "/" not in name else first

    saved, given = adapter_settings(adapter), _settings(args, names)
    for key in sorted(set(saved) & set(given)):  # said, never silent: the adapter was trained in its own
        if saved[key] != given[key]:
            print(f"loraqa {args.command}: --{key.replace('_', '-')} {given[key]!r} overrides the adapter's own "
                  f"{saved[key]!r} (it was trained with that)", file=sys.stderr)
    return load_config(args.config, {**saved, **given})


def cmd_train(args: argparse.Namespace) -> None:
    from loraqa.train import run_train

    run_train(_config(args, TRAIN_FLAGS), progress=not args.quiet)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from loraqa.evaluate import run_evaluate

    run_evaluate(_config(args, EVAL_FLAGS), args.adapter, progress=not args.quiet)


def cmd_score(args: argparse.Namespace) -> None:
    from loraqa.scoring.score import score_files

    scores, note = score_files(args.data_file, args.predictions_file, args.na_prob_file, args.na_prob_thresh)
    if note:
        print(note, file=sys.stderr)
    print(json.dumps(scores))


def cmd_quickstart(args: argparse.Namespace) -> None:
    from loraqa.quickstart import run_quickstart

    print(run_quickstart(args.output_dir, args.model, quiet=args.quiet))


def cmd_params(args: argparse.Namespace) -> None:
    from loraqa.model.lora import count_trainable

    config = _config(args, PARAMS_FLAGS)
    counts = count_trainable(config)
    print(json.dumps({"method": config.method, **counts}))
    print(f"{config.method}: {counts['trainable_params']:,} trainable of {counts['total_params']:,} "
          f"({counts['trainable_percent']:.4f}%)", file=sys.stderr)


def cmd_compare(args: argparse.Namespace) -> None:
    from loraqa.compare import run_compare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    print(f"report: {run_compare(_config(args, TRAIN_FLAGS), methods, args.extra, quiet=args.quiet)}")


def cmd_report(args: argparse.Namespace) -> None:
    from loraqa.scoring.report import write_report

    print(f"report: {write_report(args.runs, args.output_dir)}")


def cmd_merge(args: argparse.Namespace) -> None:
    from loraqa.model.lora import merge

    merge(_config(args, MERGE_FLAGS), args.adapter, args.output_dir)  # a span adapter keeps its span head


def cmd_export(args: argparse.Namespace) -> None:
    from loraqa.gguf_export import run_export

    run = run_export(_config(args, EXPORT_FLAGS), args.output, args.adapter, args.outtype, args.adapter_only,
                     args.base_gguf, progress=not args.quiet)
    print("run it:\n" + "\n".join(f"  {line}" for line in run))


def cmd_ask(args: argparse.Namespace) -> None:
    from loraqa.data.examples import Example
    from loraqa.data.extract import read_document
    from loraqa.data.load import read_questions
    from loraqa.inference.answerer import ask
    from loraqa.inference.documents import answer_row, where
    from loraqa.io import write_text_atomic

    config = _config(args, ASK_FLAGS)
    document = read_document(args.document) if args.document else None
    if args.input:
        if args.question or args.context or args.context_file:
            raise ValueError("--input replaces --context/--context-file/--question; give one or the other")
        examples = read_questions(args.input, document.text if document else None)
    else:
        if not args.question or not (args.context or args.context_file or document):
            raise ValueError("give --question with --context, --context-file or --document (or --input FILE.jsonl)")
        try:
            context = document.text if document else args.context or Path(args.context_file).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"--context-file {args.context_file}: cannot read: {e.strerror}") from None
        examples = [Example("1", "", context, args.question, ())]
    sources: dict = {}
    answers = ask(config, args.adapter, examples, sources=sources)
    rows = [answer_row(ex, answers[ex.id], document, sources.get(ex.id)) for ex in examples]
    if not args.input:
        if answers["1"] is None:
            raise ValueError("the question does not fit the model's window with an answer, even with no passage; "
                             "shorten it, or raise --max-length")
        print(answers["1"])  # an empty line when the model says the passage does not answer it
        if document:
            print(f"[loraqa] {where(rows[0])}", file=sys.stderr)
        elif not answers["1"]:
            print("[loraqa] no answer: the model says the passage does not answer the question", file=sys.stderr)
        return
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if args.output:
        write_text_atomic(args.output, lines)
    else:
        sys.stdout.write(lines)


def cmd_serve(args: argparse.Namespace) -> None:
    from loraqa.serve.server import serve
    from loraqa.serve.service import Limits

    config = _config(args, ASK_FLAGS)  # the same settings as `ask`
    if config.method == "span":
        raise ValueError("loraqa serve answers by generation; a --method span model answers with loraqa ask")
    limits = Limits(args.max_batch_size, args.max_wait_ms, args.request_timeout, args.max_prompt_tokens,
                    args.max_document_tokens, args.document_cache_mb, args.read_ahead)
    serve(config, args.adapter, args.host, args.port, limits, args.api_key_file, args.allowed_host,
          args.unauthenticated, args.admin_key_file, args.metrics_need_key, not args.one_adapter_per_batch,
          args.adapter_root)


def cmd_cache(args: argparse.Namespace) -> None:
    from loraqa.model.fetch import cache_dir
    from loraqa.model.gguf_cache import cache_size, clear_cache

    if args.action == "clear":
        freed = clear_cache()
        print(f"{cache_dir()}: freed {freed / 2**20:.1f} MiB (downloaded GGUF files kept)")
    size, files = cache_size()
    print(f"{cache_dir()}: {size / 2**20:.1f} MiB in {files} files")


COMMANDS = {"quickstart": cmd_quickstart, "train": cmd_train, "evaluate": cmd_evaluate, "score": cmd_score,
            "params": cmd_params, "compare": cmd_compare, "report": cmd_report, "merge": cmd_merge, "export": cmd_export,
            "ask": cmd_ask, "cache": cmd_cache,
            "serve": cmd_serve}
# jemalloc for the commands that train (glibc's heap fragments under gradient checkpointing); answering
# is faster on glibc with freed memory kept: docs/design-notes.md
# run again under jemalloc where the system has it (runtime.py): training's peak memory; a server's
# memory flat over hours (docs/serve.md: +2.6% over a 10-minute soak, +10.0% on glibc)
ON_JEMALLOC = {"quickstart", "train", "compare", "serve"}
EXIT_AT_ONCE = {"ask"}


def interrupted(e: KeyboardInterrupt) -> str:
    """What a Ctrl-C left behind, in one line."""
    from loraqa.training.loop import Stopped

    if isinstance(e, Stopped) and e.checkpoint is not None:
        return (f"stopped after step {e.step}; checkpoint {e.checkpoint} saved: run the same command again to "
                "resume from it")
    if isinstance(e, Stopped):
        return f"stopped after step {e.step}; this run keeps no checkpoints"
    return "interrupted; nothing was saved by this stop (a run resumes from its last checkpoint, if it has one)"


def main(argv: list[str] | None = None) -> int:
    # PEFT calls a transformers property that transformers deprecated; the warning is not the user's
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    args = build_parser().parse_args(argv)
    if argv is None and args.command in ON_JEMALLOC:  # the command line: the same command under jemalloc
        run_under_jemalloc([sys.executable, "-m", "loraqa.cli", *sys.argv[1:]])
    keep_freed_memory()
    try:
        COMMANDS[args.command](args)
        code = 0
    except ValueError as e:  # bad settings or data: one line, no traceback
        print(f"loraqa {args.command}: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt as e:
        print(f"loraqa {args.command}: {interrupted(e)}", file=sys.stderr)
        code = 130
    if argv is None and args.command in EXIT_AT_ONCE:
        # its output is written and closed: Python's teardown of torch and the model would add ~1 s to a cold
        # `ask` of SmolLM2 (benchmarks/cold_start.py), freeing what the process's end frees anyway
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
