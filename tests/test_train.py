import torch

from loraqa.config import DEFAULT_TEMPLATE, Config
from loraqa.features import build_train_features, collate_train
from loraqa.lora import add_lora
from loraqa.train import causal_lm_loss, evaluate_loss, train

CPU = torch.device("cpu")


def test_answer_only_head_equals_the_full_model_loss(tiny_model, tokenizer, examples):
    features, _ = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, 512)
    batch = collate_train(features, tokenizer.pad_token_id)
    model = add_lora(tiny_model).eval()
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(model, batch), model(**batch).loss, rtol=1e-5, atol=1e-6)


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
