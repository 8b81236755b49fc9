"""One question, one answer, whatever the batch: in the default precision (``--precision auto``), the
answers of one question set are the same in batches of 1, 2, 4 and 6, through a merged model, and
from a server asked concurrently (issue 40)."""

from concurrent.futures import ThreadPoolExecutor

import torch
from conftest import make_adapter, request, start_server

from loraqa.config import DEFAULT_TEMPLATE, load_config
from loraqa.data.batching import shared_prefix_batches
from loraqa.data.features import build_eval_features
from loraqa.inference.answerer import ask, load_answerer
from loraqa.serve.app import build_app
from loraqa.serve.service import Limits
from loraqa.model.lora import merge
from loraqa.model.precision import resolve_precision

CPU = torch.device("cpu")
SIZES = (1, 2, 4, 6)  # the fixture's 6 questions (3 passages) in batches that differ for each size


def test_answers_do_not_depend_on_the_batch_in_the_default_precision(tiny_model_dir, tokenizer, examples, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    settings = {"model": str(tiny_model_dir), "max_new_tokens": 8}  # the default precision: auto
    features, _ = build_eval_features(tokenizer, examples, DEFAULT_TEMPLATE, 512, 8)  # GPT-2's 512 positions
    tokens = load_config(None, settings).eval_batch_tokens
    batches = [shared_prefix_batches(features, size, tokens, 8) for size in SIZES]
    assert len({repr([[[f.id for f in g] for g in b] for b in batching]) for batching in batches}) == len(SIZES)
    answers = [ask(load_config(None, {**settings, "eval_batch_size": size}), str(adapter), examples)
               for size in SIZES]
    assert all(a == answers[0] for a in answers[1:])
    merged = merge(load_config(None, settings), str(adapter), str(tmp_path / "merged"))
    assert ask(load_config(None, {**settings, "model": str(merged)}), None, examples) == answers[0]
    answerer = load_answerer(load_config(None, settings), str(adapter), examples)
    url, stop = start_server(build_app(answerer, Limits(max_batch_size=8, max_wait_ms=50)))
    try:
        with ThreadPoolExecutor(len(examples)) as pool:
            replies = list(pool.map(lambda ex: request(f"{url}/answer", {"context": ex.context,
                                                                         "question": ex.question}), examples))
    finally:
        stop()
    assert [r[1]["answer"] for r in replies] == [answers[0][ex.id] for ex in examples]


def test_on_a_cpu_with_native_bf16_auto_answers_in_fp32_and_says_why(monkeypatch):
    """The rule needs no such CPU to be checked: one is stood in for, whose probe finds bf16 faster."""
    from loraqa.model import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    bf16_faster = {"fp32": 1.0, "bf16": 0.5}.get
    assert resolve_precision("auto", CPU, bf16_faster)[0] == "bf16"  # training takes it
    answering, why = resolve_precision("auto", CPU, bf16_faster, answering=True)
    assert answering == "fp32" and "--precision bf16" in why and "batch" in why
    assert resolve_precision("bf16", CPU, answering=True) == ("bf16", "set by --precision")  # asked for: given


def test_a_run_trained_in_bf16_scores_the_answers_evaluate_gives(tiny_model_dir, tmp_path, monkeypatch):
    """Where training ran in bf16 (auto may choose it on a CPU with native bf16), the run's own
    evaluation answers as `loraqa evaluate` of its adapter does, in the default answering precision."""
    import json

    from conftest import SQUAD

    from loraqa import train
    from loraqa.cli import main
    from loraqa.model.precision import store_frozen_weights

    def in_bf16(model, setting, device, **kwargs):  # as auto's probe would choose on such a CPU
        store_frozen_weights(model, "bf16")
        return "bf16", "the test's choice"

    monkeypatch.setattr(train, "apply_precision", in_bf16)
    flags = ["--model", str(tiny_model_dir), "--eval-file", str(SQUAD), "--max-length", "128", "--max-new-tokens", "6",
             "--quiet"]
    assert main(["train", *flags, "--train-file", str(SQUAD), "--epochs", "1", "--output-dir", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["precision"], metrics["answer_precision"]) == ("bf16", "fp32")
    assert main(["evaluate", *flags, "--adapter", str(tmp_path / "run" / "adapter"), "--output-dir",
                 str(tmp_path / "ev")]) == 0
    run, ev = (json.loads((tmp_path / d / "predictions.json").read_text()) for d in ("run", "ev"))
    assert run == ev
