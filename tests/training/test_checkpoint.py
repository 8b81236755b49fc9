"""A run that crashes and resumes ends exactly where an uninterrupted run does."""

import pytest
import torch

import loraqa.training.loss as train_module
from loraqa.training.checkpoint import list_checkpoints
from loraqa.config import DEFAULT_TEMPLATE, Config
from loraqa.data.features import build_train_features
from loraqa.model.lora import add_lora
from loraqa.model.load import load_model
from loraqa.model.recompute import enable_gradient_checkpointing
from loraqa.training.loop import train

CPU = torch.device("cpu")


def _fresh(tiny_model_dir, no_dropout=False):
    torch.manual_seed(0)
    if no_dropout:
        return add_lora(load_model(str(tiny_model_dir), dropout=0.0), lora_dropout=0.0)
    return add_lora(load_model(str(tiny_model_dir)), lora_dropout=0.1)  # dropout: RNG state matters


def _train(model, features, tokenizer, folder, **kw):
    config = Config(epochs=2, batch_size=2, lr=1e-2, warmup_ratio=0.2, seed=3, eval_batch_size=4, **kw)
    return train(model, features, features[:2], config, pad_id=tokenizer.pad_token_id, device=CPU,
                 precision="fp32", progress=False, checkpoint_dir=folder)


def _crash_in_step_5(monkeypatch, error: Exception, run) -> None:
    """``run()`` (2 epochs of 3 steps) raises ``error`` in step 5, after step 4 was saved."""
    calls = {"n": 0}
    real_collate = train_module.collate_train

    def crashing_collate(*args, **kwargs):
        calls["n"] += 1
        # 3 batches collated up front (the largest batch is logged), 3 train steps, 1 eval-loss batch,
        # step 4 (saved): crash in step 5
        if calls["n"] == 9:
            raise error
        return real_collate(*args, **kwargs)

    monkeypatch.setattr(train_module, "collate_train", crashing_collate)
    with pytest.raises(type(error), match=str(error)):
        run()
    monkeypatch.setattr(train_module, "collate_train", real_collate)


def test_crash_and_resume_equals_uninterrupted(tiny_model_dir, tokenizer, examples, tmp_path, monkeypatch):
    features, _ = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, 512)  # 3 steps an epoch
    reference = _fresh(tiny_model_dir)
    expected = _train(reference, features, tokenizer, tmp_path / "a")

    _crash_in_step_5(monkeypatch, RuntimeError("simulated crash"),
                     lambda: _train(_fresh(tiny_model_dir), features, tokenizer, tmp_path / "b", save_steps=2))
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-00000003", "step-00000004"]

    (tmp_path / "b" / ".step-00000005.tmp").mkdir()  # a save killed half-way is never loaded
    resumed_model = _fresh(tiny_model_dir)
    resumed = _train(resumed_model, features, tokenizer, tmp_path / "b", save_steps=2)

    assert expected[1] == resumed[1]  # the loss curve survives the crash too
    for a, b in zip(expected[0], resumed[0]):
        assert (a["epoch"], a["train_loss"], a["eval_loss"], a["lr"]) == (b["epoch"], b["train_loss"], b["eval_loss"], b["lr"])
    ref = dict(reference.named_parameters())
    for name, p in resumed_model.named_parameters():
        assert torch.equal(p, ref[name]), name


def test_a_run_resumed_with_the_memory_settings_ends_where_it_would_have(tiny_model_dir, tokenizer, examples, tmp_path,
                                                                         monkeypatch):
    """The remedy for a run that ran out of memory late: resume it with checkpointing and micro-batches.
    No dropout: micro-batches draw their own dropout masks, the same update only in distribution."""
    features, _ = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, 512)
    reference = _fresh(tiny_model_dir, no_dropout=True)
    expected = _train(reference, features, tokenizer, tmp_path / "a")

    _crash_in_step_5(monkeypatch, MemoryError("simulated out of memory"),
                     lambda: _train(_fresh(tiny_model_dir, no_dropout=True), features, tokenizer, tmp_path / "b",
                                    save_steps=2))

    resumed_model = _fresh(tiny_model_dir, no_dropout=True)
    enable_gradient_checkpointing(resumed_model)
    resumed = _train(resumed_model, features, tokenizer, tmp_path / "b", save_steps=2,
                     gradient_checkpointing=True, max_batch_tokens=1)  # every question its own micro-batch

    assert [r["epoch"] for r in resumed[0]] == [1, 2]
    assert resumed[0][-1]["train_loss"] == pytest.approx(expected[0][-1]["train_loss"], rel=1e-5)
    ref = dict(reference.named_parameters())
    for name, p in resumed_model.named_parameters():
        torch.testing.assert_close(p, ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_keeps_only_the_newest_checkpoints(tiny_model_dir, tokenizer, examples, tmp_path):
    features, _ = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, 512)
    _train(_fresh(tiny_model_dir), features, tokenizer, tmp_path, save_steps=1, keep_checkpoints=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000005", "step-00000006"]
    assert {f.name for f in (tmp_path / "step-00000006").iterdir()} == {
        "trainable.safetensors", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng-0.pt", "state.json"}


def test_a_kill_while_a_checkpoint_is_deleted_never_leaves_it_half_there(tiny_model_dir, tmp_path, monkeypatch):
    """Saving a step again (each epoch's end) and pruning old steps delete folders; a kill half-way
    must not leave a folder named like a checkpoint with files missing (a resume would load it)."""
    from loraqa.training import checkpoint

    model = add_lora(load_model(str(tiny_model_dir)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def save(step):
        checkpoint.save_checkpoint(tmp_path, step, model, optimizer, scheduler, scaler, {"step": step}, keep=2)

    save(1)
    save(2)
    real_rmtree = checkpoint.shutil.rmtree

    def killed_half_way(path, ignore_errors=False):  # deletes one file, then the process "dies"
        files = sorted(p for p in path.iterdir()) if path.is_dir() else []
        if files:
            files[0].unlink()
            raise KeyboardInterrupt("killed")
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_half_way)
    for step in (3, 3):  # step 3 prunes step 1 (keep 2); then step 3 is saved again
        with pytest.raises(KeyboardInterrupt):
            save(step)
    complete = {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "scaler.pt", "state.json", "rng-0.pt"}
    listed = list_checkpoints(tmp_path)
    assert listed and all({p.name for p in c.iterdir()} == complete for c in listed), listed
