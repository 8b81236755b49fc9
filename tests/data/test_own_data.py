"""Your own data: the same questions in every format give the same predictions; bad rows exit 2."""

import json

import pytest

from conftest import SQUAD
from loraqa.cli import main
from loraqa.data.load import load_examples, sample_file
from test_records import FORMATS, as_rows, where, write


@pytest.fixture()
def one_thread():
    """Six evaluations of a tiny model: one thread is fastest, and steady on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _evaluate(model, data, out, *extra) -> dict:
    args = ["evaluate", "--model", str(model), "--eval-file", str(data), "--output-dir", str(out),
            "--max-new-tokens", "4", "--precision", "fp32", "--eval-batch-size", "8", "--quiet", *extra]
    assert main(args) == 0
    return json.loads((out / "predictions.json").read_text())


def test_40_questions_in_every_format_give_the_same_predictions(tiny_model_dir, tmp_path, one_thread):
    rows = as_rows(load_examples(str(sample_file("eval")), "validation", limit=40))
    predictions = {kind: _evaluate(tiny_model_dir, write(rows, tmp_path / "data", kind), tmp_path / kind)
                   for kind in FORMATS}
    # and under other column names, mapped back with --columns
    renamed = [{{"context": "passage", "question": "query"}.get(k, k): v for k, v in r.items()} for r in rows]
    mapped = write(renamed, tmp_path / "data", "csv", "renamed")
    predictions["mapped"] = _evaluate(tiny_model_dir, mapped, tmp_path / "mapped",
                                      "--columns", "question=query,context=passage")
    assert len(predictions["json"]) == 40
    assert len(set(predictions["json"].values())) > 1  # answers differ by question: equal files mean equal inputs
    assert all(p == predictions["json"] for p in predictions.values())


@pytest.mark.parametrize("kind", FORMATS[1:])
def test_a_bad_row_in_any_format_is_one_line_and_exit_2(kind, tiny_model_dir, tmp_path, capsys):
    rows = as_rows(load_examples(str(SQUAD), "validation"))
    rows[3]["answers"]["answer_start"][0] += 1
    path = write(rows, tmp_path, kind)
    code = main(["evaluate", "--model", str(tiny_model_dir), "--eval-file", str(path),
                 "--output-dir", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("loraqa evaluate: error:"), err
    assert f"{path.name}: {where(kind, 3)} (id q4): field 'answers': answer_start[0]=" in err[-1]
    assert not any("Traceback" in line for line in err)
