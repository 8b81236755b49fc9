"""One typed config for every command: defaults, YAML presets, flag overrides, validation.

Precedence: dataclass defaults < YAML file (``--config``) < command-line flags.
Every run writes the resolved config to ``<output_dir>/config.yaml``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loraqa.data.prompt import DEFAULT_TEMPLATE
from loraqa.data.records import parse_columns


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field whose help text becomes the flag's help."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # --- model -------------------------------------------------------------------------------
    model: str = _f("gpt2", "hub name, local folder, or .gguf file of a causal LM")
    init: str = _f("pretrained", "pretrained weights, or 'random' (seeded, built from the config)",
                   choices=["pretrained", "random"])
    tokenizer: str | None = _f(None, "tokenizer location when it differs from --model")
    model_dropout: float | None = _f(None, "set the base model's own dropout rates (default: the model's config)")
    allow_other_weights: bool = _f(False, "use --adapter on base weights other than those it was trained on "
                                          "(its loraqa.json records them; loraqa refuses them otherwise)")
    # --- data --------------------------------------------------------------------------------
    train_file: str | None = _f(None, "training questions: SQuAD v1.1 .json(.gz), .jsonl, .csv, .parquet or a "
                                      "save_to_disk folder (default: the hub dataset's train split)")
    eval_file: str | None = _f(None, "evaluation questions, in the same formats as --train-file "
                                     "(default: the hub dataset's validation split)")
    dataset: str | None = _f(None, "hub dataset in the squad schema when no --train-file/--eval-file is given "
                                   "(default: rajpurkar/squad)")
    columns: dict[str, str] | None = _f(None, "map loraqa's fields to your columns: question=query,context=passage,...")
    max_train_examples: int | None = _f(None, "keep the first N training questions (file order)")
    max_eval_examples: int | None = _f(None, "keep the first N evaluation questions (file order)")
    template: str = _f(DEFAULT_TEMPLATE, "prompt template with {context} and {question}, once each")
    max_length: int | None = _f(None, "token budget for prompt + answer (default: the model's window)")
    allow_unanswerable: bool = _f(False, "accept questions without answers (SQuAD v2.0 style); "
                                         "v2.0 files allow them by themselves")
    no_answer_text: str = _f("", "the training target of an unanswerable question ('' : EOS right after the cue)")
    # --- method ------------------------------------------------------------------------------
    method: str = _f("lora", "'lora' trains adapters; 'full' trains every weight; 'span' adds an extractive "
                             "start/end head (trained in full) to the LoRA-adapted model instead of generating",
                     choices=["lora", "full", "span"])
    r: int = _f(8, "LoRA rank")
    lora_alpha: float = _f(16.0, "LoRA scaling numerator (scale = lora_alpha / r)")
    lora_dropout: float = _f(0.1, "dropout on the LoRA input")
    target_modules: list[str] | None = _f(
        None, "comma-separated module names, or all-linear (default: PEFT's per-architecture list, c_attn for GPT-2)")
    use_rslora: bool = _f(False, "scale adapters by lora_alpha / sqrt(r) (rsLoRA) instead of lora_alpha / r")
    # --- training ----------------------------------------------------------------------------
    epochs: int = _f(3, "passes over the training set")
    batch_size: int = _f(4, "training examples per optimizer step (global, all processes)")
    group_by_passage: bool = _f(
        False, "batch each passage's questions together and run the passage once per batch (faster on SQuAD)")
    gradient_checkpointing: bool = _f(
        False, "recompute each layer's activations in the backward pass instead of keeping them (less memory, more time: docs/memory.md)")
    max_batch_tokens: int | None = _f(
        None, "run a batch over N padded tokens as micro-batches with gradient accumulation (the same update; "
              "with LoRA dropout, other masks); the epoch-end eval loss too")
    lr: float = _f(2e-4, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_ratio: float = _f(0.06, "share of steps with linear warmup; then linear decay to 0")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    precision: str = _f("auto", "'auto' (whichever is faster here: bf16 on GPUs that have it, else fp16; fp32 on "
                                "CPUs without native bf16; on CPUs with it, a short timed probe decides), 'bf16', "
                                "'fp16' or 'fp32'",
                        choices=["auto", "bf16", "fp16", "fp32"])
    seed: int = _f(42, "seed for weights (random init), LoRA init, dropout and data order")
    save_steps: int = _f(0, "save a checkpoint every N optimizer steps (0: only at epoch ends)")
    keep_checkpoints: int = _f(2, "how many of the newest checkpoints to keep")
    report_to: str | None = _f(None, "send the loss curve, eval loss, EM/F1 and config to a tracker: tensorboard, "
                                     "wandb, mlflow, ... (comma-separated; default: none)")
    # --- evaluation --------------------------------------------------------------------------
    eval_loss_examples: int | None = _f(
        None, "score the per-epoch eval loss on the first N evaluation questions (0 skips it; default: all)")
    eval_batch_size: int = _f(64, "most questions decoded together")
    eval_batch_tokens: int = _f(16384, "most cached tokens in a decoding batch (rows x (prompt + new tokens))")
    max_new_tokens: int = _f(32, "longest generated answer, in tokens")
    draft_tokens: int = _f(8, "guess up to this many of an answer's next tokens from its passage and check them in "
                              "one forward (prompt lookup: the same answers, fewer forwards; 0: off)")
    constrain_to_context: bool = _f(False, "decode only answers that are spans of the passage (train's "
                                           "final evaluation, evaluate, ask, serve)")
    na_prob_thresh: float | None = _f(
        None, "generation: say 'no answer' exactly when its probability is above this (a run's squad_v2 "
              "best_f1_thresh); default: greedy decoding's own choice")
    doc_stride: int = _f(128, "tokens shared by neighbouring windows of a long passage (generation and span)")
    window_tokens: int = _f(1024, "a passage longer than this many tokens (or than the prompt budget) is read in "
                                  "windows of at most this many, and one answer chosen across them")
    windows_per_question: int = _f(3, "how many of a long passage's windows each question is read in (the best "
                                      "by BM25)")
    document_level: bool = _f(False, "evaluate: ask each question against its whole document (its title's "
                                     "paragraphs joined, SQuAD-document) instead of its paragraph")
    negative_windows: int = _f(0, "train: for each question, this many windows of its whole document that do not "
                                  "hold its answer, as unanswerable examples (a reader for documents learns to say "
                                  "'not here')")
    # --- output ------------------------------------------------------------------------------
    output_dir: str = _f("runs/latest", "run folder (config, history, predictions, metrics, adapter)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the setting; called on every construction and override."""
        for name in ("r", "epochs", "batch_size", "eval_batch_size", "eval_batch_tokens", "max_new_tokens",
                     "keep_checkpoints", "window_tokens", "windows_per_question"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.doc_stride < self.window_tokens:
            raise ValueError(f"--doc-stride must be in 0..{self.window_tokens - 1} (below --window-tokens), "
                             f"got {self.doc_stride}")
        for name in ("save_steps", "eval_loss_examples", "negative_windows", "draft_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("max_train_examples", "max_eval_examples", "max_length", "max_batch_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1, got {value}")
        if self.model_dropout is not None and not 0.0 <= self.model_dropout < 1.0:
            raise ValueError(f"--model-dropout must be in [0, 1), got {self.model_dropout}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.na_prob_thresh is not None and not 0.0 <= self.na_prob_thresh <= 1.0:
            raise ValueError(f"--na-prob-thresh must be in [0, 1], got {self.na_prob_thresh}")
        if self.na_prob_thresh is not None and self.method == "span":
            raise ValueError("--na-prob-thresh applies to generation; --method span decides from its start/end scores")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        for name in ("init", "method", "precision"):
            choices = _FIELDS[name].metadata["choices"]
            if getattr(self, name) not in choices:
                raise ValueError(f"--{_flag(name)} must be one of {choices}, got {getattr(self, name)!r}")
        for key in ("{context}", "{question}"):
            if self.template.count(key) != 1:
                raise ValueError(f"--template must contain {key} exactly once: {self.template!r}")
        if self.report_to is not None and (not isinstance(self.report_to, str) or not self.report_to.strip()):
            raise ValueError(f"--report-to must name a tracker (tensorboard, wandb, mlflow, ...) or none, "
                             f"got {self.report_to!r}")
        self.columns = parse_columns(self.columns)  # "question=query,..." from a flag -> a dict
        if isinstance(self.target_modules, str):
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> Config:
        return load_config(None, {**self.to_dict(), **overrides})


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}

# Settings a run may change when it resumes: they bound memory, pace checkpoints or name a tracker,
# and leave the update the same (to float rounding; with LoRA dropout, micro-batches draw other masks),
# so a run that ran out of memory at step 900 resumes with --gradient-checkpointing or
# --max-batch-tokens instead of starting over.
RESUME_MAY_CHANGE = frozenset({"gradient_checkpointing", "max_batch_tokens", "save_steps", "keep_checkpoints",
                               "report_to", "eval_batch_size", "eval_batch_tokens", "draft_tokens"})


def _flag(name: str) -> str:
    return name.replace("_", "-")


def presets() -> dict[str, Path]:
    """The YAML presets that ship in the package (``src/loraqa/configs/``), by name."""
    from importlib.resources import files

    folder = Path(str(files("loraqa") / "configs"))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def find_config(name: str | Path) -> Path:
    """A YAML file's path, or a preset's name (``recommended``) -> the shipped file."""
    path = Path(name)
    if path.is_file() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    known = presets()
    if str(name) not in known:
        raise ValueError(f"--config {name}: no such file, and no preset of that name (presets: {', '.join(known)})")
    return known[str(name)]


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file (or preset name) ``path``, then ``overrides``; unknown keys are errors."""
    values: dict[str, Any] = {}
    if path is not None:
        path = find_config(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ValueError(f"cannot read config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of settings")
        values.update(loaded)
    values.update(overrides or {})
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        where = f"config file {path}" if path else "settings"
        raise ValueError(f"unknown keys in {where}: {', '.join(unknown)} (known: {', '.join(_FIELDS)})")
    return Config(**{k: _coerce(k, v) for k, v in values.items()})


def _coerce(name: str, value: Any) -> Any:
    """Numbers given as text (YAML reads `2e-4` as a string) become the field's number type."""
    kind = str(_FIELDS[name].type).split(" | ")[0]
    number = {"int": int, "float": float}.get(kind)
    if number is None or value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and not (number is int and isinstance(value, float)):
        return number(value)
    try:
        return number(value) if isinstance(value, str) else number(str(value))
    except ValueError:
        raise ValueError(f"setting {name} must be {kind}, got {value!r}") from None


def save_config(config: Config, path: str | Path) -> None:
    from loraqa.io import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))


def fields() -> dict[str, dataclasses.Field]:
    """The Config fields by name (the CLI builds its flags from these)."""
    return dict(_FIELDS)
