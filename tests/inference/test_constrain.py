"""--constrain-to-context: answers are spans of their passage; unchanged where greedy already was one."""

import json
from dataclasses import replace

import torch

from loraqa.cli import main
from loraqa.config import DEFAULT_TEMPLATE
from loraqa.inference.constrain import _squash, ContextConstraint
from loraqa.data.features import build_eval_features
from loraqa.inference.generate import predict
from loraqa.inference.settings import DecodeSettings

CPU = torch.device("cpu")


def test_constrained_answers_are_spans_and_greedy_spans_are_kept(tiny_model, tokenizer, examples):
    features, _ = build_eval_features(tokenizer, examples, DEFAULT_TEMPLATE, 512, 8)
    settings = DecodeSettings(512, batch_size=4, max_new_tokens=8)
    contexts = {ex.id: ex.context for ex in examples}
    plain = predict(tiny_model, tokenizer, features, settings, CPU, contexts=contexts, progress=False)
    held = predict(tiny_model, tokenizer, features, replace(settings, constrain_to_context=True), CPU,
                   contexts=contexts, progress=False)
    squashed = {k: _squash(c) for k, c in contexts.items()}
    assert all(_squash(a) in squashed[k] for k, a in held.items())
    assert any(_squash(a) not in squashed[k] for k, a in plain.items()), "the tiny model strays: the test needs it"
    for k, a in plain.items():
        if _squash(a) in squashed[k]:
            assert held[k] == a


def test_the_constraint_takes_the_best_token_that_fits(tokenizer):
    rule = ContextConstraint(tokenizer, ["The mill was rebuilt in 1887."], top_k=3)
    mill = tokenizer.encode(" mill")[0]
    stray = next(i for i in range(len(tokenizer))  # a word that is not in the passage
                 if tokenizer.decode([i]).strip().isalpha() and tokenizer.decode([i]).strip() not in "The mill was rebuilt")
    logits = torch.zeros(1, len(tokenizer))
    logits[0, stray], logits[0, mill] = 5.0, 4.0
    assert rule(logits, [[]], [0]).tolist() == [mill]  # stray is likelier but not in the passage
    logits[0, mill] = -1.0  # nothing in the top 3 fits: the answer ends
    assert rule(logits, [[]], [0]).tolist() == [tokenizer.eos_token_id]


def test_evaluate_flag_holds_answers_to_the_passage(tiny_model_dir, tmp_path):
    from conftest import SQUAD

    out = tmp_path / "run"
    assert main(["evaluate", "--model", str(tiny_model_dir), "--eval-file", str(SQUAD), "--max-new-tokens", "6",
                 "--precision", "fp32", "--constrain-to-context", "--output-dir", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["constrain_to_context"] is True and metrics["analysis"]["not_in_context_share"] == 0.0


def test_serve_holds_answers_as_ask_does(tiny_model_dir, examples):
    from conftest import request, start_server

    from loraqa.config import load_config
    from loraqa.inference.answerer import ask, load_answerer
    from loraqa.serve.app import build_app
    from loraqa.serve.service import Limits

    config = load_config(None, {"model": str(tiny_model_dir), "precision": "fp32", "max_new_tokens": 6,
                                "constrain_to_context": True})
    expected = ask(config, None, examples)
    assert all(_squash(a) in _squash(ex.context) for ex, a in zip(examples, expected.values()))
    answerer = load_answerer(config, None, examples)
    url, stop = start_server(build_app(answerer, Limits(max_batch_size=8, max_wait_ms=20)))
    try:
        status, reply = request(f"{url}/answer", {"questions": [{"context": ex.context, "question": ex.question}
                                                                for ex in examples]})
    finally:
        stop()
    assert status == 200 and [a["answer"] for a in reply["answers"]] == [expected[ex.id] for ex in examples]
