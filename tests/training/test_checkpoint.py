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
from loraqa.training.processes import Processes

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
        "trainable.safetensors", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng-0.pt", "state.json", "manifest.json"}


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
    complete = {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "scaler.pt", "state.json", "rng-0.pt",
                "manifest.json"}
    listed = list_checkpoints(tmp_path)
    assert listed and all({p.name for p in c.iterdir()} == complete for c in listed), listed


def _parts(tiny_model_dir):
    """What a checkpoint saves: model, optimizer, scheduler, scaler."""
    model = add_lora(load_model(str(tiny_model_dir)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False)


def _save(folder, step, parts, keep=2):
    import dataclasses

    from loraqa.training.checkpoint import save_checkpoint
    from loraqa.training.loop import LoopState

    save_checkpoint(folder, step, *parts, dataclasses.asdict(LoopState(step=step)), keep=keep)


def test_a_kill_between_moving_a_step_aside_and_renaming_its_new_save_in_leaves_one_to_resume(
        tiny_model_dir, tmp_path, monkeypatch):
    """keep_checkpoints 1 and a step saved again (an epoch's end): the first save is renamed aside,
    not deleted, until the new one is in; a kill between leaves it where a resume finds it."""
    from pathlib import Path

    from loraqa.training.loop import resume
    from loraqa.training.processes import Processes

    parts = _parts(tiny_model_dir)
    _save(tmp_path, 1, parts, keep=1)
    real_rename = Path.rename

    def killed_before_the_new_save_is_in(self, target):
        if self.name.endswith(".tmp"):
            raise KeyboardInterrupt("killed")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_before_the_new_save_is_in)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 1, parts, keep=1)
    monkeypatch.undo()
    state = resume(tmp_path, *parts, Processes.single())
    assert state is not None and state.step == 1
    _save(tmp_path, 1, parts, keep=1)  # the next save puts the step back under its own name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


class _TwoProcesses(Processes):
    """Process 0 of two; the collectives bring back ``other``, process 1's view of the checkpoints
    (what it can read), and no failure from it."""

    def __init__(self, other: dict) -> None:
        super().__init__(None)
        self.world, self.other = 2, other

    def gather(self, items: list) -> list:
        return list(items) + [self.other]

    def sum(self, tensor):
        return tensor


def test_every_process_resumes_the_newest_checkpoint_all_of_them_can_read(tiny_model_dir, tmp_path, capsys):
    """Process 1 cannot read the newest checkpoint: process 0, which can, takes the one before too."""
    from loraqa.training.loop import resume

    parts = _parts(tiny_model_dir)
    _save(tmp_path, 1, parts)
    _save(tmp_path, 2, parts)
    capsys.readouterr()
    state = resume(tmp_path, *parts, _TwoProcesses({1: None, 2: "rng-1.pt is missing"}))
    assert state is not None and state.step == 1
    err = capsys.readouterr().err
    assert "checkpoint step-00000002 is damaged (process 1: rng-1.pt is missing; set aside as" in err


def test_the_checkpoint_to_resume_is_decided_from_every_process_view():
    from loraqa.training.checkpoint import agree_on_checkpoint

    assert agree_on_checkpoint([{3: None, 4: None}, {3: None, 4: None}]) == (4, {})
    assert agree_on_checkpoint([{3: None, 4: None}, {3: None, 4: "rng-1.pt is missing"}]) == (
        3, {4: "process 1: rng-1.pt is missing"})
    assert agree_on_checkpoint([{3: None, 4: None}, {3: None}]) == (3, {4: "process 1: not found"})
    assert agree_on_checkpoint([{4: "no readable manifest.json (FileNotFoundError)"}]) == (
        None, {4: "no readable manifest.json (FileNotFoundError)"})
    assert agree_on_checkpoint([{}, {}]) == (None, {})
    with pytest.raises(ValueError, match=r"step-00000004 was saved by fewer processes \(no rng-1.pt\); resume with as"):
        agree_on_checkpoint([{4: None}, {4: "saved by fewer processes (no rng-1.pt)"}])


def test_the_manifest_holds_each_files_size_and_sha256(tiny_model_dir, tokenizer, examples, tmp_path):
    import hashlib
    import json

    features, _ = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, 512)
    _train(_fresh(tiny_model_dir), features, tokenizer, tmp_path)
    newest = list_checkpoints(tmp_path)[-1]
    files = json.loads((newest / "manifest.json").read_text())["files"]
    assert set(files) == {p.name for p in newest.iterdir()} - {"manifest.json"}
    for name, entry in files.items():
        data = (newest / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_resumes(damage, tiny_model_dir, tokenizer,
                                                                            examples, tmp_path, monkeypatch, capsys):
    """A power cut can leave a checkpoint's file short or gone: the resume takes the one before,
    says so, and ends with the adapter an uninterrupted run ends with (one thread: to the bit)."""
    torch.set_num_threads(1)
    features, _ = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, 512)
    reference = _fresh(tiny_model_dir)
    _train(reference, features, tokenizer, tmp_path / "a")

    _crash_in_step_5(monkeypatch, RuntimeError("simulated crash"),
                     lambda: _train(_fresh(tiny_model_dir), features, tokenizer, tmp_path / "b", save_steps=2))
    newest = list_checkpoints(tmp_path / "b")[-1]
    assert newest.name == "step-00000004"
    if damage == "truncated":
        weights = newest / "trainable.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (newest / "optimizer.pt").unlink()
    capsys.readouterr()
    resumed_model = _fresh(tiny_model_dir)
    _train(resumed_model, features, tokenizer, tmp_path / "b", save_steps=2)
    err = capsys.readouterr().err
    reason = "trainable.safetensors holds 100 bytes" if damage == "truncated" else "optimizer.pt is missing"
    assert f"checkpoint step-00000004 is damaged ({reason}" in err and "set aside as .step-00000004.damaged" in err
    assert "resuming from" in err and "step-00000003" in err
    assert (tmp_path / "b" / ".step-00000004.damaged").is_dir()  # kept for a look, out of a resume's sight
    ref = dict(reference.named_parameters())
    for name, p in resumed_model.named_parameters():
        assert torch.equal(p, ref[name]), name


def test_with_no_sound_checkpoint_the_run_says_so_and_starts_over(tiny_model_dir, tokenizer, examples, tmp_path,
                                                                   monkeypatch, capsys):
    features, _ = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, 512)
    _crash_in_step_5(monkeypatch, RuntimeError("simulated crash"),
                     lambda: _train(_fresh(tiny_model_dir), features, tokenizer, tmp_path, save_steps=2))
    for checkpoint in list_checkpoints(tmp_path):
        (checkpoint / "manifest.json").unlink()
    capsys.readouterr()
    history, _ = _train(_fresh(tiny_model_dir), features, tokenizer, tmp_path, save_steps=2)
    err = capsys.readouterr().err
    assert "no readable manifest.json" in err
    assert f"no sound checkpoint in {tmp_path} (2 damaged): training starts from the beginning" in err
    assert [r["epoch"] for r in history] == [1, 2]


def test_ctrl_c_saves_the_step_in_progress(tiny_model_dir, tokenizer, examples, tmp_path, monkeypatch):
    """Ctrl-C during a step (chosen by a seeded draw): that step ends, its checkpoint is saved, no
    further step runs, and training stops saying which checkpoint it saved."""
    import json
    import os
    import random
    import signal

    from loraqa.training.loop import Stopped

    features, _ = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, 512)  # 3 steps an epoch
    step = random.Random(2024).randint(1, 5)
    calls = {"n": 0}
    real_collate = train_module.collate_train

    def interrupting_collate(*args, **kwargs):
        calls["n"] += 1
        # 3 batches collated up front, then one a step: the (3 + step)-th is step `step`'s (epoch 1)
        # or, past the epoch's eval-loss batch, one later
        if calls["n"] == 3 + step + (step > 3):
            os.kill(os.getpid(), signal.SIGINT)
        return real_collate(*args, **kwargs)

    monkeypatch.setattr(train_module, "collate_train", interrupting_collate)
    with pytest.raises(Stopped) as stopped:
        _train(_fresh(tiny_model_dir), features, tokenizer, tmp_path)
    assert stopped.value.step == step and stopped.value.checkpoint == tmp_path / f"step-{step:08d}"
    assert json.loads((stopped.value.checkpoint / "state.json").read_text())["step"] == step
    assert list_checkpoints(tmp_path)[-1].name == f"step-{step:08d}"  # nothing after the step in progress


def test_what_ctrl_c_left_is_said_in_one_line():
    from loraqa.cli import interrupted
    from loraqa.training.loop import Stopped

    assert interrupted(Stopped(7, None)) == "stopped after step 7; this run keeps no checkpoints"
    saved = interrupted(Stopped(7, "runs/x/checkpoints/step-00000007"))
    assert "checkpoint runs/x/checkpoints/step-00000007 saved: run the same command again" in saved
    # a second Ctrl-C, or one while loading: nothing was saved by it, and the line does not say otherwise
    assert "nothing was saved by this stop" in interrupted(KeyboardInterrupt())
