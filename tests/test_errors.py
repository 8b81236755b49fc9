"""Every user mistake: one line naming what is wrong, exit code 2, no traceback."""

import json

import pytest

from conftest import SQUAD
from loraqa.cli import main


@pytest.fixture()
def files(tmp_path, tiny_model_dir):
    data = json.loads(SQUAD.read_text())
    data["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] = 3
    (tmp_path / "shifted.json").write_text(json.dumps(data))
    data = json.loads(SQUAD.read_text())
    del data["data"][1]["paragraphs"][0]["qas"][1]["question"]
    (tmp_path / "noquestion.json").write_text(json.dumps(data))
    (tmp_path / "broken.json").write_text("{oops")
    (tmp_path / "unreadable.json").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"\0")
    (tmp_path / "other-run").mkdir()
    (tmp_path / "other-run" / "config.yaml").write_text("epochs: 7\n")
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("mine")
    (tmp_path / "not-an-adapter").mkdir()
    (tmp_path / "bad.yaml").write_text("learning_rate: 0.1\n")
    row = {"context": "Denver won.", "question": "Who won?"}
    for name, lines in {"dup.jsonl": [{**row, "id": "a"}, {**row, "id": "a"}],
                        "dup-number.jsonl": [row, row, {**row, "id": 1}],
                        "not-object.jsonl": [row, [1, 2]]}.items():
        (tmp_path / name).write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "huge-int.jsonl").write_text('{"context": "c", "question": "q", "id": ' + "7" * 5000 + "}\n")
    return {"tmp": tmp_path, "model": tiny_model_dir, "squad": SQUAD}


def _train(*extra):
    return ["train", "--model", "{model}", "--train-file", "{squad}", "--eval-file", "{squad}",
            "--output-dir", "{tmp}/out", "--quiet", *extra]


CASES = [
    ("missing file", ["score", "{tmp}/missing.json", "{tmp}/p.json"], "missing.json: no such file"),
    ("unreadable file", ["score", "{tmp}/unreadable.json", "{tmp}/p.json"], "unreadable.json: cannot read"),
    ("malformed JSON", ["score", "{tmp}/broken.json", "{tmp}/p.json"], "broken.json: not valid JSON (line 1"),
    ("missing field", ["train", "--model", "{model}", "--train-file", "{tmp}/noquestion.json", "--eval-file", "{squad}",
                       "--output-dir", "{tmp}/out"], "question q5: missing field 'question'"),
    ("answer_start off", ["score", "{tmp}/shifted.json", "{squad}"],
     "question q1, answers[0]: field 'answer_start'=3 does not point at 'Denver Broncos'"),
    ("not a model", ["params", "--model", "{tmp}/weights.bin"], "a file, but not a .gguf"),
    ("no such model", ["params", "--model", "{tmp}/nothing/here"], "no such folder or file"),
    ("model folder without config", ["params", "--model", "{tmp}/not-an-adapter"], "cannot load it"),
    ("not an adapter", ["evaluate", "--model", "{model}", "--adapter", "{tmp}/not-an-adapter", "--eval-file", "{squad}",
                        "--output-dir", "{tmp}/ev"], "no adapter_config.json there"),
    ("targets match nothing", ["params", "--model", "{model}", "--target-modules", "q_proj"], "match no module of gpt2"),
    ("max length too small", _train("--max-length", "8"), "--max-length 8 is too small: the template alone takes"),
    ("max length over window", _train("--max-length", "4096"), "exceeds the model's window of 512"),
    ("output dir of another run", _train()[:-2] + ["{tmp}/other-run", "--quiet"], "holds a run with other settings (epochs"),
    ("output dir not a run", _train()[:-2] + ["{tmp}/stranger", "--quiet"], "is not empty and holds no loraqa run"),
    ("bad setting", ["train", "--model", "{model}", "--r", "0"], "--r must be >= 1"),
    ("unknown config key", ["train", "--config", "{tmp}/bad.yaml"], "unknown keys in config file"),
    ("duplicate ids", ["ask", "--model", "{model}", "--input", "{tmp}/dup.jsonl"],
     "dup.jsonl: line 2: id 'a' is also line 1's id; ids must be unique"),
    ("id equal to a line's number", ["ask", "--model", "{model}", "--input", "{tmp}/dup-number.jsonl"],
     "dup-number.jsonl: line 3: id '1' is also line 1's number (a line without an id is called by it)"),
    ("line not an object", ["ask", "--model", "{model}", "--input", "{tmp}/not-object.jsonl"],
     "not-object.jsonl: line 2: not a JSON object but list"),
    ("integer too long", ["ask", "--model", "{model}", "--input", "{tmp}/huge-int.jsonl"],
     "huge-int.jsonl: line 1: not valid JSON (Exceeds the limit"),
    ("question too long", ["ask", "--model", "{model}", "--max-length", "40", "--max-new-tokens", "4",
                           "--context", "Denver won.", "--question", "Who " * 40 + "won?"],
     "the question does not fit the model's window with an answer, even with no passage"),
]


@pytest.mark.parametrize("name, args, message", CASES, ids=[c[0] for c in CASES])
def test_user_mistakes(name, args, message, files, capsys):
    args = [a.format(**files) for a in args]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"loraqa {args[0]}: error:") and message in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_empty_dataset_after_filtering(files, capsys, tmp_path):
    (tmp_path / "empty.json").write_text(json.dumps({"version": "1.1", "data": []}))
    args = [a.format(**files) for a in _train()]
    args[4] = str(tmp_path / "empty.json")
    assert main(args) == 2
    assert "empty.json: no questions left to use" in capsys.readouterr().err


def test_adapter_for_another_base_model(files, tmp_path, capsys):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from loraqa.model.lora import add_lora

    other = GPT2LMHeadModel(GPT2Config(vocab_size=400, n_positions=512, n_embd=48, n_layer=2, n_head=2))
    torch.manual_seed(0)
    add_lora(other).save_pretrained(tmp_path / "wide-adapter")
    args = ["evaluate", "--model", str(files["model"]), "--adapter", str(tmp_path / "wide-adapter"),
            "--eval-file", str(SQUAD), "--output-dir", str(tmp_path / "ev2")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was made for another base model" in err and "size mismatch" in err


def test_questions_that_do_not_fit_are_reported_as_such_not_as_no_answer(files, tmp_path, capsys):
    rows = [{"id": "short", "context": "Denver won.", "question": "Who won?"},
            {"id": "long", "context": "Denver won.", "question": "Who " * 40 + "won?"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["ask", "--model", str(files["model"]), "--max-length", "40", "--max-new-tokens", "4",
                 "--input", str(tmp_path / "q.jsonl"), "--output", str(tmp_path / "a.jsonl")]) == 0
    out = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert out[1] == {"id": "long", "question": rows[1]["question"], "answer": None, "no_answer": False,
                      "error": "not answered: the question does not fit the model's window, even with no passage"}
    assert isinstance(out[0]["answer"], str) and "error" not in out[0]
    assert "1 question(s) not answered: too long to fit in 40 tokens with the answer, even with no passage: long" in \
        capsys.readouterr().err
