"""Precision: what `auto` chooses and why, bf16 weights stored once, and the bf16 path on any CPU."""

import json

import pytest
import torch

from conftest import SQUAD
from loraqa.model import precision as P
from loraqa.cli import main
from loraqa.training.processes import Processes
from loraqa.data.features import build_train_features
from loraqa.model.lora import add_lora
from loraqa.training.loss import answer_loss_sum, answer_tokens, train_step_probe

CPU = torch.device("cpu")


def test_a_given_precision_is_kept():
    assert P.resolve_precision("bf16", CPU) == ("bf16", "set by --precision")
    assert P.resolve_precision("fp32", CPU)[0] == "fp32"


def test_auto_on_a_cpu_without_native_bf16_is_fp32_without_probing(monkeypatch):
    monkeypatch.setattr(P, "native_bf16", lambda device: False)

    def probe(precision):
        raise AssertionError("no probe on a CPU that would emulate bf16")

    precision, why = P.resolve_precision("auto", CPU, probe)
    assert precision == "fp32" and "no native bf16" in why


@pytest.mark.parametrize("fp32_ms, bf16_ms, expected", [(10, 20, "fp32"), (20, 10, "bf16")])
def test_auto_on_a_native_bf16_cpu_picks_the_faster(monkeypatch, fp32_ms, bf16_ms, expected):
    monkeypatch.setattr(P, "native_bf16", lambda device: True)
    timings = {"fp32": fp32_ms / 1000, "bf16": bf16_ms / 1000}
    precision, why = P.resolve_precision("auto", CPU, timings.__getitem__)
    assert precision == expected
    assert f"fp32 {fp32_ms} ms/step" in why and f"bf16 {bf16_ms} ms/step" in why


@pytest.mark.parametrize("bf16_ms, expected", [(95, "fp32"), (70, "bf16")])
def test_auto_takes_bf16_only_when_the_probe_finds_it_clearly_faster(monkeypatch, bf16_ms, expected):
    """A few timed steps carry noise: bf16 5% faster is noise (fp32), 30% faster is not (bf16)."""
    monkeypatch.setattr(P, "native_bf16", lambda device: True)
    timings = {"fp32": 0.100, "bf16": bf16_ms / 1000}
    precision, why = P.resolve_precision("auto", CPU, timings.__getitem__)
    assert precision == expected
    assert "fp32 100 ms/step" in why and f"bf16 {bf16_ms} ms/step" in why
    assert f"{100 - bf16_ms}% faster" in why and f"at least {P.BF16_MARGIN:.0%} faster" in why


def test_the_probe_times_the_median_of_its_repeats(monkeypatch):
    """One slow step among the repeats (a page fault, another process) does not move the timing."""
    clock = {"now": 0.0}
    durations = iter([5.0, 1.0, 10.0, 1.0])  # a warm-up, then the repeats
    monkeypatch.setattr(P.time, "perf_counter", lambda: clock["now"])

    def step():
        clock["now"] += next(durations)

    assert P.time_steps(step, repeats=3) == 1.0


def test_auto_answers_in_fp32_on_a_gpu_too_and_trains_in_bf16(monkeypatch):
    """Answering's auto is fp32 on a GPU as on a CPU: one answer whatever the batch (bf16 also ran
    slower on an H200); training's auto on a GPU keeps bf16. No CUDA is needed: nothing runs on it."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    gpu = torch.device("cuda")

    def probe(precision):
        raise AssertionError("answering's auto needs no probe")

    precision, why = P.resolve_precision("auto", gpu, probe, answering=True)
    assert precision == "fp32" and "GPU" in why and "batch" in why and "--precision bf16" in why
    assert P.resolve_precision("auto", gpu) == ("bf16", "auto: the GPU computes bf16 natively")
    assert P.resolve_precision("bf16", gpu, answering=True) == ("bf16", "set by --precision")


def test_bf16_stores_frozen_weights_once_and_keeps_lora_and_embeddings_fp32(tiny_model):
    model = add_lora(tiny_model, target_modules=["c_attn"], lora_dropout=0.0)
    lm = model.get_base_model()
    assert lm.lm_head.weight is lm.transformer.wte.weight  # GPT-2 ties its head to the embeddings
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    restore = P.store_frozen_weights(model, "bf16")
    frozen = [m for m in model.modules() if type(m).__name__ == "Conv1D"]
    assert frozen and all(m.weight.dtype == torch.bfloat16 for m in frozen)
    assert lm.lm_head.weight.dtype == torch.bfloat16 and lm.transformer.wte.weight.dtype == torch.float32
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    restore()
    assert lm.lm_head.weight is lm.transformer.wte.weight  # tied again
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n


def test_bf16_training_step_follows_fp32(tiny_model, tokenizer, examples):
    """The bf16 path (emulated where the CPU lacks it) gives the fp32 loss and gradients to bf16 rounding."""
    model = add_lora(tiny_model, target_modules=["c_attn"], lora_dropout=0.0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    features, _ = build_train_features(tokenizer, examples, "Context: {context}\nQuestion: {question}\nAnswer:", 128)
    from loraqa.data.features import collate_train
    batch = collate_train(features[:4], tokenizer.pad_token_id)
    results = {}
    for precision in ("fp32", "bf16"):
        restore = P.store_frozen_weights(model, precision)
        with P.autocast(CPU, precision):
            loss = answer_loss_sum(model, batch) / answer_tokens(batch)
        loss.backward()
        results[precision] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad(set_to_none=True)
        restore()
    (loss32, grads32), (loss16, grads16) = results["fp32"], results["bf16"]
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    for n in grads32:
        cosine = torch.nn.functional.cosine_similarity(grads32[n].flatten(), grads16[n].flatten(), dim=0)
        assert cosine > 0.99, n


def test_the_probe_times_both_and_leaves_weights_and_rng_as_they_were(monkeypatch, tiny_model, tokenizer, examples):
    monkeypatch.setattr(P, "native_bf16", lambda device: True)
    model = add_lora(tiny_model, target_modules=["c_attn"], lora_dropout=0.1)
    features, _ = build_train_features(tokenizer, examples, "Context: {context}\nQuestion: {question}\nAnswer:", 128)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    probe = P.probe_precision(model, train_step_probe(model, features, 2, tokenizer.pad_token_id, CPU))
    assert probe("fp32") > 0 and probe("bf16") > 0
    assert torch.equal(torch.get_rng_state(), rng)  # the run draws the dropout masks it would have drawn
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]) and p.grad is None, n
    precision, why = P.apply_precision(model, "auto", CPU, train_step_probe(model, features, 2, tokenizer.pad_token_id, CPU),
                                       Processes.single())
    assert precision in {"fp32", "bf16"} and "probe" in why


@pytest.mark.parametrize("model_dir", ["tiny_model_dir", "tiny_llama_dir"])  # Llama: keys fp32, values bf16
def test_train_and_evaluate_in_bf16_end_to_end(model_dir, request, tmp_path):
    args = ["--model", str(request.getfixturevalue(model_dir)), "--eval-file", str(SQUAD), "--max-length", "128", "--max-new-tokens", "4",
            "--precision", "bf16", "--quiet"]
    assert main(["train", *args, "--train-file", str(SQUAD), "--epochs", "1", "--output-dir", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["precision"] == "bf16" and metrics["precision_reason"] == "set by --precision"
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor([h["train_loss"], h["eval_loss"]])).all() for h in history)
    assert main(["evaluate", *args, "--adapter", str(tmp_path / "run" / "adapter"), "--output-dir", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "predictions.json").read_text())
    assert again == json.loads((tmp_path / "run" / "predictions.json").read_text())


def test_one_process_chooses_its_own_value():
    assert Processes.single().choose("bf16", list(P.DTYPES)) == "bf16"
