import json

import pytest

from conftest import SQUAD
from loraqa.cli import main
from loraqa.training.tracking import PACKAGES, tracker_names, Tracking


def test_tracker_names():
    assert tracker_names(None) == [] and tracker_names("none") == []
    assert tracker_names(" tensorboard, wandb,tensorboard") == ["tensorboard", "wandb"]


def test_unknown_or_missing_trackers_fail_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="unknown tracker"):
        Tracking("tensorbored", tmp_path)
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    missing = next((n for n in PACKAGES if n not in available), None)
    if missing is None:
        pytest.skip("every tracker package is installed")
    with pytest.raises(ValueError, match=f"pip install {PACKAGES[missing]}"):
        Tracking(missing, tmp_path)


def test_train_with_tensorboard_leaves_readable_event_files(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package reads the event files")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--train-file", str(SQUAD), "--eval-file", str(SQUAD),
                 "--output-dir", str(out), "--epochs", "2", "--batch-size", "2", "--max-length", "128",
                 "--max-new-tokens", "4", "--eval-batch-size", "4", "--precision", "fp32", "--quiet",
                 "--report-to", "tensorboard"]) == 0
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    # the loss curve, point for point, as steps.jsonl holds it
    assert [s for s, _ in scalars["train_loss"]] == [p["step"] for p in steps]
    assert [v for _, v in scalars["train_loss"]] == pytest.approx([p["train_loss"] for p in steps], rel=1e-6)
    assert [s for s, _ in scalars["lr"]] == [p["step"] for p in steps]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [v for _, v in scalars["eval_loss"]] == pytest.approx([r["eval_loss"] for r in history], rel=1e-6)
    metrics = json.loads((out / "metrics.json").read_text())
    assert scalars["exact_match"] == [(steps[-1]["step"], pytest.approx(metrics["exact_match"]))]
    assert scalars["f1"] == [(steps[-1]["step"], pytest.approx(metrics["f1"]))]
    assert list((out / "tensorboard").rglob("hparams.yml")), "the run's config is stored with the events"
