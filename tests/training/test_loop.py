import torch

from loraqa.config import DEFAULT_TEMPLATE, Config
from loraqa.data.batching import collate_context_train
from loraqa.data.features import build_train_features, collate_train
from loraqa.model.lora import add_lora
from loraqa.training.loop import train
from loraqa.training.loss import answer_loss_sum, answer_tokens, evaluate_loss

CPU = torch.device("cpu")


def test_answer_only_head_equals_the_full_model_loss(tiny_model, tokenizer, examples):
    features, _ = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, 512)
    batch = collate_train(features, tokenizer.pad_token_id)
    model = add_lora(tiny_model).eval()
    with torch.no_grad():
        torch.testing.assert_close(answer_loss_sum(model, batch) / answer_tokens(batch), model(**batch).loss, rtol=1e-5, atol=1e-6)


def test_a_short_run_lowers_the_loss(tiny_model, tokenizer, examples):
    features, _ = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, 512)
    torch.manual_seed(0)
    model = add_lora(tiny_model, r=8, lora_dropout=0.0)
    before = evaluate_loss(model, features, 8, tokenizer.pad_token_id, CPU, "fp32")
    rows = []
    config = Config(epochs=8, batch_size=2, lr=3e-2, warmup_ratio=0.0, seed=0, eval_batch_size=8)
    history, steps = train(model, features, features, config, pad_id=tokenizer.pad_token_id, device=CPU,
                           precision="fp32", on_epoch_end=lambda h, s: rows.append(h[-1]), progress=False)
    assert history == rows and [r["epoch"] for r in rows] == list(range(1, 9))
    assert rows[-1]["eval_loss"] < 0.8 * before, (before, rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["lr"] == 0.0  # linear decay ends at zero
    # 3 steps an epoch: a loss-curve point every 10 steps and at each epoch's end
    assert [p["step"] for p in steps] == [3, 6, 9, 10, 12, 15, 18, 20, 21, 24]
    assert steps[-1]["train_loss"] < steps[0]["train_loss"]


def test_only_lora_weights_change_in_training(tiny_model, tokenizer, examples):
    features, _ = build_train_features(tokenizer, examples[:2], DEFAULT_TEMPLATE, 512)
    model = add_lora(tiny_model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, features, features, Config(epochs=1, batch_size=2, lr=1e-2, warmup_ratio=0.0),
          pad_id=tokenizer.pad_token_id, device=CPU, precision="fp32", progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)


def test_passage_batches_give_the_same_loss_and_gradients(tiny_model, tokenizer, examples):
    features, _ = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, 512)
    model = add_lora(tiny_model, lora_dropout=0.0)
    for p in model.parameters():
        if p.requires_grad:  # LoRA's B starts at zero: make the adapter's path matter
            torch.nn.init.normal_(p, std=0.1)

    def loss_and_grads(batch):
        model.zero_grad()
        loss = answer_loss_sum(model, batch) / answer_tokens(batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    shared = collate_context_train(features, tokenizer.pad_token_id)
    assert shared["prefix_mask"].sum() > 0 and len(shared["prefix_ids"]) < len(features)  # some passage is shared
    loss, grads = loss_and_grads(shared)
    plain_loss, plain_grads = loss_and_grads(collate_train(features, tokenizer.pad_token_id))
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_training_with_passage_batches_learns(tiny_model, tokenizer, examples):
    features, _ = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, 512)
    torch.manual_seed(0)
    model = add_lora(tiny_model, r=8, lora_dropout=0.0)
    before = evaluate_loss(model, features, 8, tokenizer.pad_token_id, CPU, "fp32")
    config = Config(epochs=8, batch_size=2, lr=3e-2, warmup_ratio=0.0, seed=0, group_by_passage=True)
    history, _ = train(model, features, features, config, pad_id=tokenizer.pad_token_id, device=CPU,
                       precision="fp32", progress=False)
    assert history[-1]["eval_loss"] < 0.8 * before
    # passages are computed once per batch: fewer tokens run than the examples hold
    assert history[-1]["train_tokens"] < sum(len(f.input_ids) for f in features)
