"""End to end through the command line, on the tiny model and the fixture."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import SQUAD
from loraqa import cli
from loraqa.cli import main


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main(["train", "--model", str(tiny_model_dir), "--train-file", str(SQUAD), "--eval-file", str(SQUAD),
                 "--output-dir", str(out), "--epochs", "2", "--batch-size", "2", "--max-length", "128",
                 "--max-new-tokens", "6", "--eval-batch-size", "4", "--precision", "fp32", "--quiet"])
    assert code == 0
    return out


def test_train_writes_every_file_of_the_run_folder(run):
    assert sorted(p.name for p in run.iterdir()) == [
        "adapter", "config.yaml", "history.jsonl", "metrics.json", "predictions.json", "steps.jsonl", "weights.json"]
    assert {"adapter_config.json", "adapter_model.safetensors", "loraqa.json"} <= {p.name for p in (run / "adapter").iterdir()}
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["epochs"] == 2 and config["max_length"] == 128
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all({"train_loss", "eval_loss"} <= set(h) for h in history)
    predictions = json.loads((run / "predictions.json").read_text())
    assert list(predictions) == ["q1", "q2", "q3", "q4", "q5", "q6"]
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("exact_match", "f1", "n_questions", "trainable_params", "total_params", "train_seconds", "eval_seconds"):
        assert key in metrics
    assert metrics["n_questions"] == 6 and metrics["trainable_params"] == 2 * 8 * (32 + 96)
    assert metrics["train_windowed"] >= 1 and metrics["documents_in_windows"] >= 1  # the long context at 128 tokens


def test_evaluate_on_the_saved_adapter_reproduces_the_predictions(run, tiny_model_dir, tmp_path):
    code = main(["evaluate", "--model", str(tiny_model_dir), "--adapter", str(run / "adapter"),
                 "--eval-file", str(SQUAD), "--output-dir", str(tmp_path), "--eval-batch-size", "4",
                 "--max-new-tokens", "6", "--precision", "fp32", "--quiet"])
    assert code == 0
    assert json.loads((tmp_path / "predictions.json").read_text()) == json.loads((run / "predictions.json").read_text())
    assert json.loads((tmp_path / "metrics.json").read_text())["max_length"] == 128  # taken from the adapter


def test_score_is_the_official_script(tmp_path, capsys):
    predictions = tmp_path / "p.json"
    predictions.write_text(json.dumps({"q1": "the Denver Broncos!", "q2": "Levi's Stadium in Santa Clara",
                                       "q3": "24–10", "q6": "forty two"}))  # q6: "fortytwo" after normalising
    assert main(["score", str(SQUAD), str(predictions)]) == 0
    out, err = capsys.readouterr()
    f1_q2 = 2 * (1 * 5 / 6) / (1 + 5 / 6)  # best gold is the longer one: all 5 predicted tokens, 5 of its 6
    assert json.loads(out) == pytest.approx({"exact_match": 100 * 2 / 6, "f1": 100 * (2 + f1_q2) / 6})
    assert "2 unanswered" in err


def test_params(tiny_model_dir, capsys):
    assert main(["params", "--model", str(tiny_model_dir), "--init", "random"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable_params"] == 2048


@pytest.mark.parametrize("command", ["train", "evaluate", "compare", "ask", "serve", "merge", "quickstart"])
def test_every_help_page_renders(command, capsys):
    """argparse formats help strings with %: a bare % in one broke --help for train and compare."""
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0 and "usage: loraqa" in capsys.readouterr().out


@pytest.mark.parametrize("command, names", [("evaluate", cli.EVAL_FLAGS), ("ask", cli.ASK_FLAGS)])
def test_batch_size_is_the_older_name_of_eval_batch_size_in_evaluate_and_ask(command, names, capsys):
    """One name per meaning: --batch-size is training's; evaluate and ask still take it, unlisted."""
    args = cli.build_parser().parse_args([command, "--batch-size", "8"])
    assert cli._config(args, names).eval_batch_size == 8
    assert "--eval-batch-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = capsys.readouterr().out
    assert "--eval-batch-size" in help_text and "--batch-size" not in help_text


def test_answering_gives_what_peft_and_generate_give_one_question_at_a_time(run, tiny_model_dir):
    """The answering path (adapter merged, passages prefilled once, rows in runs and leaving as they
    stop) answers a trained adapter's questions as the standard recipe does: PEFT's unmerged model
    and transformers' greedy ``generate``, one question at a time."""
    import torch

    from loraqa.config import Config
    from loraqa.data.features import build_eval_features
    from loraqa.data.prompt import cut_answer
    from loraqa.data.squad import load_squad_file
    from loraqa.inference.answerer import load_answerer
    from loraqa.inference.generate import stop_token_ids
    from loraqa.model.load import load_model
    from loraqa.model.lora import load_adapter

    examples = load_squad_file(SQUAD)
    config = Config(model=str(tiny_model_dir), max_length=128, max_new_tokens=6, eval_batch_size=4, precision="fp32")
    answerer = load_answerer(config, str(run / "adapter"), examples)
    assert not hasattr(answerer.model, "peft_config")  # merged: a plain transformers model
    features, _ = answerer.features(examples)
    ours = answerer.decode(features, {ex.id: ex.context for ex in examples})

    tokenizer = answerer.tokenizer
    peft = load_adapter(load_model(str(tiny_model_dir)), run / "adapter").eval()
    theirs = {}
    for f in build_eval_features(tokenizer, examples, config.template, 128, 6)[0]:
        ids = torch.tensor([f.input_ids[:f.n_prompt]])
        out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                            eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
        theirs[f.id] = cut_answer(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert ours == theirs and len(ours) == len(examples)


@pytest.mark.parametrize("argv", [["--help"], ["ask", "--help"], ["serve", "--help"], ["cache"], ["score"]])
def test_help_score_and_cache_start_without_torch(argv, tmp_path):
    if argv == ["score"]:
        (tmp_path / "p.json").write_text(json.dumps({"q1": "Denver Broncos"}))
        argv = ["score", str(SQUAD), str(tmp_path / "p.json")]
    code = ("import sys\nfrom loraqa.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'imported torch'\n")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]


def test_a_cold_ask_writes_its_answer_and_exits_at_once_and_a_second_one_reads_the_cache(tiny_model_dir, own_cache):
    """On the command line ``ask`` ends without Python's teardown: its answer and exit code are all there;
    the second process finds the path and causality checks recorded."""
    argv = [sys.executable, "-m", "loraqa.cli", "ask", "--model", str(tiny_model_dir), "--context",
            "The mill was rebuilt in 1846.", "--question", "When was the mill rebuilt?", "--max-new-tokens", "4"]
    first, second = (subprocess.run(argv, capture_output=True, text=True) for _ in range(2))
    assert first.returncode == second.returncode == 0, first.stderr[-500:]
    assert first.stdout == second.stdout and first.stdout.endswith("\n")
    assert len(list((own_cache / "checks").iterdir())) == 2
    bad = subprocess.run(argv[:-2] + ["--max-new-tokens", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "error" in bad.stderr
