"""Memory bounds: gradient checkpointing and micro-batches change memory, never the update."""

import json

import pytest
import torch

from conftest import SQUAD
from loraqa.data.batching import collate_context_train, micro_batches, padded_tokens
from loraqa.cli import main
from loraqa.config import DEFAULT_TEMPLATE, Config
from loraqa.data.features import build_train_features, collate_train
from loraqa.model.lora import add_lora
from loraqa.model.load import load_model
from loraqa.model.recompute import enable_gradient_checkpointing
from loraqa.runtime import allocator
from loraqa.training.loop import train
from loraqa.training.loss import answer_loss_sum, answer_tokens, evaluate_loss

CPU = torch.device("cpu")


def _lora(tiny_model):
    torch.manual_seed(0)
    model = add_lora(tiny_model, lora_dropout=0.0)
    for p in model.parameters():
        if p.requires_grad:  # LoRA's B starts at zero: make the adapter's path matter
            torch.nn.init.normal_(p, std=0.1)
    return model


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = answer_loss_sum(model, batch) / answer_tokens(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("collate", [collate_train, collate_context_train], ids=["plain", "passage batches"])
def test_checkpointing_recomputes_layers_and_keeps_the_loss_and_gradients(tiny_model_dir, tokenizer, examples,
                                                                         collate, arch):
    features, _ = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, 512)
    batch = collate(features, tokenizer.pad_token_id)
    base = load_model(str(tiny_model_dir), dropout=0.0) if arch == "gpt2" else _tiny_llama(tokenizer)
    model = _lora(base).train()  # checkpointing acts in training mode
    loss, grads = _loss_and_grads(model, batch)
    calls = []
    layer = model.get_base_model().get_decoder().layers[0] if arch == "llama" else model.get_base_model().transformer.h[0]
    attention = layer.self_attn.q_proj if arch == "llama" else layer.attn.c_attn
    attention.register_forward_hook(lambda *a: calls.append(1))
    _loss_and_grads(model, batch)
    without = len(calls)
    enable_gradient_checkpointing(model)
    calls.clear()
    checkpointed_loss, checkpointed_grads = _loss_and_grads(model, batch)
    assert len(calls) == 2 * without  # each layer ran again in the backward pass
    torch.testing.assert_close(checkpointed_loss, loss, rtol=1e-6, atol=1e-7)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_micro_batches_cover_the_batch_within_the_budget(tokenizer, examples):
    features, _ = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, 512)
    whole = collate_train(features, tokenizer.pad_token_id)
    budget = padded_tokens(whole) // 3
    parts = micro_batches(features, collate_train, tokenizer.pad_token_id, budget)
    assert len(parts) > 1 and sum(len(p["input_ids"]) for p in parts) == len(features)
    longest = max(len(f.input_ids) for f in features)
    assert all(padded_tokens(p) <= max(budget, longest) for p in parts)
    assert micro_batches(features, collate_train, tokenizer.pad_token_id, None)[0]["input_ids"].shape == whole["input_ids"].shape


@pytest.mark.parametrize("passages", [False, True], ids=["plain", "passage batches"])
def test_micro_batches_give_the_whole_batchs_update(tiny_model_dir, tokenizer, examples, passages):
    features, _ = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, 256)
    results = []
    for max_batch_tokens in (None, 200):
        model = _lora(load_model(str(tiny_model_dir), dropout=0.0))
        config = Config(epochs=2, batch_size=6, lr=1e-2, warmup_ratio=0.0, seed=0, group_by_passage=passages,
                        max_batch_tokens=max_batch_tokens, lora_dropout=0.0)
        history, _ = train(model, features, [], config, pad_id=tokenizer.pad_token_id, device=CPU,
                           precision="fp32", progress=False)
        results.append((history, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    (whole_history, whole), (micro_history, micro) = results
    assert micro_history[0]["largest_batch_tokens"] < whole_history[0]["largest_batch_tokens"]
    for a, b in zip(whole_history, micro_history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    for name in whole:
        torch.testing.assert_close(micro[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_eval_loss_keeps_within_the_token_budget(tiny_model_dir, tokenizer, examples):
    """The epoch-end eval loss runs its batches as micro-batches too: a run bounded by
    --max-batch-tokens must not peak in its eval loss (it did: 32 questions of 768 tokens at once)."""
    features, _ = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, 256)
    model = _lora(load_model(str(tiny_model_dir), dropout=0.0))
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    whole = evaluate_loss(model, features, 8, tokenizer.pad_token_id, CPU, "fp32")
    widest, seen[:] = max(seen), []
    budget = widest // 3
    bounded = evaluate_loss(model, features, 8, tokenizer.pad_token_id, CPU, "fp32", max_batch_tokens=budget)
    hook.remove()
    assert bounded == pytest.approx(whole, rel=1e-5)
    longest = max(len(f.input_ids) for f in features)
    assert len(seen) > 1 and max(seen) <= max(budget, longest) < widest


def test_both_settings_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    assert main(["train", "--model", str(tiny_model_dir), "--train-file", str(SQUAD), "--eval-file", str(SQUAD),
                 "--epochs", "1", "--batch-size", "4", "--max-length", "128", "--max-new-tokens", "4",
                 "--gradient-checkpointing", "--max-batch-tokens", "300", "--group-by-passage",
                 "--precision", "fp32", "--output-dir", str(tmp_path), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "largest batch this epoch:" in err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["gradient_checkpointing"] is True and metrics["max_batch_tokens"] == 300
    assert metrics["allocator"] == allocator()  # the malloc bounds the peak too (runtime.py)
    assert ("glibc's malloc fragments" in err) == (allocator() == "glibc")
    assert 0 < metrics["largest_batch_tokens"] <= 300
    assert 0 < metrics["train_peak_memory_mb"] <= metrics["peak_memory_mb"]  # training's peak, then the run's


@pytest.mark.parametrize("collate", [collate_train, collate_context_train], ids=["plain", "passage batches"])
def test_checkpointing_replays_lora_dropout_masks_without_drawing_them_again(tiny_model_dir, tokenizer, examples,
                                                                             collate):
    from torch.profiler import profile

    features, _ = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, 512)
    batch = collate(features, tokenizer.pad_token_id)
    runs = 2 if collate is collate_context_train else 1  # passage batches run each layer for prefixes and rows
    torch.manual_seed(0)
    model = add_lora(load_model(str(tiny_model_dir), dropout=0.0), lora_dropout=0.3, target_modules=["all-linear"])
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    torch.manual_seed(1)
    loss, grads = _loss_and_grads(model, batch)  # torch's own dropout
    replayed = enable_gradient_checkpointing(model)
    assert replayed == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 layers
    torch.manual_seed(1)
    with profile() as prof:
        checkpointed_loss, checkpointed_grads = _loss_and_grads(model, batch)
    draws = sum(e.count for e in prof.key_averages() if e.key == "aten::bernoulli_")
    assert draws == replayed * runs  # once per dropout per forward call; the recomputation replays the bits
    torch.testing.assert_close(checkpointed_loss, loss, rtol=1e-6, atol=1e-7)  # the same masks
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
