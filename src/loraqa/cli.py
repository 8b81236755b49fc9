"""``loraqa`` command line: parse flags into a Config and call the job. Wiring only.

    loraqa train     fine-tune (LoRA or full), evaluate, write a run folder
    loraqa evaluate  generate + score a base model or a saved adapter
    loraqa score     DATA_FILE PREDICTIONS_FILE, like SQuAD's evaluate-v1.1.py
    loraqa params    trainable / total parameter counts
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loraqa.config import fields, load_config

TRAIN_FLAGS = list(fields())
EVAL_FLAGS = ["model", "init", "tokenizer", "eval_file", "max_eval_examples", "template", "max_length",
              "eval_batch_size", "max_new_tokens", "precision", "seed", "output_dir"]
PARAMS_FLAGS = ["model", "init", "seed", "method", "r", "lora_alpha", "lora_dropout", "target_modules"]
ALIASES = {"evaluate": {"eval_batch_size": ["--batch-size"]}}


def _add_config_flags(parser: argparse.ArgumentParser, names: list[str], command: str) -> None:
    """One flag per Config field; defaults are suppressed so only given flags override."""
    all_fields = fields()
    for name in names:
        f = all_fields[name]
        kind = str(f.type)
        flags = [f"--{name.replace('_', '-')}"] + ALIASES.get(command, {}).get(name, [])
        parser.add_argument(*flags, dest=name, default=argparse.SUPPRESS, help=f.metadata["help"],
                            type=int if kind.startswith("int") else float if kind.startswith("float") else str,
                            choices=f.metadata.get("choices"))
    parser.add_argument("--config", help="YAML file of settings (flags override it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraqa", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune, evaluate, write a run folder")
    _add_config_flags(p, TRAIN_FLAGS, "train")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("evaluate", help="generate answers and score them")
    _add_config_flags(p, EVAL_FLAGS, "evaluate")
    p.add_argument("--adapter", help="PEFT adapter folder (a run's adapter/) to apply to --model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser("score", help="EM/F1 of a predictions file, as evaluate-v1.1.py")
    p.add_argument("data_file", help="SQuAD v1.1 JSON with the gold answers")
    p.add_argument("predictions_file", help="JSON object {question id: answer}")
    p = sub.add_parser("params", help="trainable / total parameters")
    _add_config_flags(p, PARAMS_FLAGS, "params")
    return parser


def _settings(args: argparse.Namespace, names: list[str]) -> dict:
    return {k: v for k, v in vars(args).items() if k in names}


def cmd_train(args: argparse.Namespace) -> None:
    from loraqa.pipeline import run_train

    run_train(load_config(args.config, _settings(args, TRAIN_FLAGS)), progress=not args.quiet)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from loraqa.pipeline import adapter_settings, run_evaluate

    saved = adapter_settings(args.adapter) if args.adapter else {}  # reproduce the training prompts
    config = load_config(args.config, {**saved, **_settings(args, EVAL_FLAGS)})
    run_evaluate(config, args.adapter, progress=not args.quiet)


def cmd_score(args: argparse.Namespace) -> None:
    from loraqa.data import DataError, load_squad_file
    from loraqa.metrics import squad_scores

    examples = load_squad_file(args.data_file)
    try:
        predictions = json.loads(Path(args.predictions_file).read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"{args.predictions_file}: cannot read: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{args.predictions_file}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(predictions, dict) or not all(isinstance(v, str) for v in predictions.values()):
        raise DataError(f"{args.predictions_file}: must be a JSON object of question id -> answer string")
    scores = squad_scores({ex.id: ex.answers for ex in examples}, predictions)
    if scores["n_unanswered"]:
        print(f"{scores['n_unanswered']} unanswered questions will receive score 0.", file=sys.stderr)
    print(json.dumps({"exact_match": scores["exact_match"], "f1": scores["f1"]}))


def cmd_params(args: argparse.Namespace) -> None:
    from loraqa.lora import parameter_counts, prepare_model
    from loraqa.model import count_parameters, load_model

    config = load_config(args.config, _settings(args, PARAMS_FLAGS))
    model = load_model(config.model, config.init, config.seed)
    base_total = count_parameters(model)[1]
    model = prepare_model(model, config.method, config.r, config.lora_alpha, config.lora_dropout,
                          config.target_modules)
    counts = parameter_counts(model, base_total)
    print(json.dumps({"method": config.method, **counts}))
    print(f"{config.method}: {counts['trainable_params']:,} trainable of {counts['total_params']:,} "
          f"({counts['trainable_percent']:.4f}%)", file=sys.stderr)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "score": cmd_score, "params": cmd_params}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except ValueError as e:  # bad settings or data: one line, no traceback
        print(f"loraqa {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loraqa {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
