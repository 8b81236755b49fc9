"""Send a run's numbers to experiment trackers (``--report-to``), through Accelerate's trackers.

What goes out: the run's config at the start, the loss curve (``train_loss`` and ``lr`` at every
point of ``steps.jsonl``), ``eval_loss`` and the epoch's ``epoch_train_loss`` at each epoch's last
step, and ``exact_match`` / ``f1`` at the end. TensorBoard writes event files under
``<run folder>/tensorboard/``; the others (wandb, mlflow, ...) go wherever their own settings say,
under the project name ``loraqa``.

This mirrors ``Accelerator.init_trackers`` without making an ``Accelerator``: the training loop
has its own (``Processes``), and only the main process ever builds a :class:`Tracking`.
"""

from __future__ import annotations

from pathlib import Path

TENSORBOARD_DIR = "tensorboard"
# tracker name -> what to pip install where it is missing
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet-ml",
            "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


def tracker_names(report_to: str | None) -> list[str]:
    """``"tensorboard,wandb"`` -> ``["tensorboard", "wandb"]``; None or ``none`` -> []."""
    names = [n.strip() for n in (report_to or "").split(",") if n.strip()]
    return [] if names == ["none"] else list(dict.fromkeys(names))


def start_trackers(names: list[str], run_dir: str | Path) -> list:
    """Started Accelerate trackers; ``ValueError`` naming the package to install when one is missing."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    trackers = []
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(f"--report-to {name}: unknown tracker (known: {', '.join(LOGGER_TYPE_TO_CLASS)}, none)")
        if name not in available:
            raise ValueError(f"--report-to {name} needs the {PACKAGES.get(name, name)} package: "
                             f"pip install {PACKAGES.get(name, name)}")
        kind = LOGGER_TYPE_TO_CLASS[name]
        if name == "tensorboard":  # <run folder>/tensorboard/, beside the run's other files
            trackers.append(kind(TENSORBOARD_DIR, str(run_dir)))
        elif kind.requires_logging_directory:
            trackers.append(kind("loraqa", str(Path(run_dir) / name)))
        else:
            trackers.append(kind("loraqa"))
    for tracker in trackers:
        tracker.start()
    return trackers


def _plain(value):
    """Trackers' hyperparameters take bool/int/float/str: lists and mappings become text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return "none" if value is None else value
    return str(value)


class Tracking:
    """The run's trackers (none unless ``--report-to`` names some); every call is a no-op without."""

    def __init__(self, report_to: str | None, run_dir: str | Path, config: dict | None = None) -> None:
        self.trackers = start_trackers(tracker_names(report_to), run_dir)
        if config is not None:
            for tracker in self.trackers:
                tracker.store_init_configuration({k: _plain(v) for k, v in config.items()})

    def log(self, values: dict, step: int) -> None:
        values = {k: v for k, v in values.items() if v is not None}  # e.g. an eval loss that was skipped
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def log_point(self, point: dict) -> None:
        """One point of the loss curve: {step, epoch, lr, train_loss}."""
        self.log({"train_loss": point["train_loss"], "lr": point["lr"]}, step=point["step"])

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
