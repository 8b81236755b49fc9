"""`loraqa quickstart`: the recommended preset on the bundled sample, two rows, and how to try the result."""

import json

from loraqa.data.load import load_examples, sample_file
from loraqa.model.fetch import SMOLLM2
from loraqa.quickstart import ask_command, quickstart_config, summary


def test_the_bundled_sample_is_whole_passages_of_squad():
    train, evals = load_examples(str(sample_file("train")), "train"), load_examples(str(sample_file("eval")), "eval")
    assert (len(train), len(evals)) == (1001, 302)
    assert not {e.context for e in train} & {e.context for e in evals}  # different articles
    assert all(len(e.answers) >= 1 for e in evals)  # every gold answer kept for scoring


def test_quickstart_is_the_recommended_preset_on_the_sample(monkeypatch, tmp_path):
    monkeypatch.setattr("loraqa.quickstart.resolve_model", lambda name: "/models/smollm2.gguf")
    config = quickstart_config(str(tmp_path))
    assert (config.model, config.r, config.target_modules, config.lr, config.group_by_passage) == (
        "/models/smollm2.gguf", 16, ["all-linear"], 5e-4, True)
    assert config.train_file == str(sample_file("train")) and config.eval_file == str(sample_file("eval"))
    assert config.max_train_examples is None and config.max_eval_examples is None  # all of the sample


def test_summary_prints_both_rows_and_the_ask_command(monkeypatch, tmp_path):
    monkeypatch.setattr("loraqa.quickstart.resolve_model", lambda name: name)
    runs = []
    for method, f1 in (("zero-shot", 8.5), ("lora", 61.25)):
        metrics = {"method": method, "exact_match": f1 - 8, "f1": f1, "trainable_params": 0 if method == "zero-shot"
                   else 4884480, "eval_seconds": 70.0, "n_questions": 302}
        if method == "lora":
            metrics["train_seconds"] = 600.0
        runs.append({"metrics": metrics})
        (tmp_path / method).mkdir()
        (tmp_path / method / "metrics.json").write_text(json.dumps(metrics))
    lines = summary(*runs).splitlines()
    assert lines[1].split()[:3] == ["zero-shot", "0.50", "8.50"]
    assert lines[2].split()[:5] == ["lora", "53.25", "61.25", "4,884,480", "10.0"]
    command = ask_command(quickstart_config(str(tmp_path)))
    assert command.startswith(f"loraqa ask --model {SMOLLM2} --adapter {tmp_path}/lora/adapter --context ")
