"""The run folder: a rerun resumes only a run with the same settings, memory settings aside."""

import pytest
import yaml

from loraqa.config import Config
from loraqa.runs import claim_output_dir


def test_a_run_folder_takes_a_resume_that_changes_only_memory_or_tracking(tmp_path, capsys):
    first = Config(output_dir=str(tmp_path / "run"), lr=1e-3)
    claim_output_dir(first)
    resumed = first.replace(gradient_checkpointing=True, max_batch_tokens=2048, report_to="tensorboard")
    claim_output_dir(resumed)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["gradient_checkpointing"], saved["max_batch_tokens"], saved["report_to"]) == (True, 2048,
                                                                                               "tensorboard")
    assert "max_batch_tokens was None, now 2048" in capsys.readouterr().err

    with pytest.raises(ValueError, match=r"holds a run with other settings \(lr, r\)"):
        claim_output_dir(resumed.replace(lr=2e-3, r=4, save_steps=10))
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["lr"] == 1e-3  # untouched
