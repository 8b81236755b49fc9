import json

import pytest

from conftest import SQUAD
from loraqa.data.examples import DataError
from loraqa.data.load import load_examples
from loraqa.data.records import to_examples
from loraqa.data.squad import load_squad_file, parse_squad


def test_fixture_flattens_to_examples(examples):
    assert [e.id for e in examples] == ["q1", "q2", "q3", "q4", "q5", "q6"]
    q1 = examples[0]
    assert q1.title == "Denver_Broncos"
    assert q1.answers == ("Denver Broncos", "The Denver Broncos", "Denver Broncos")  # all golds, in order
    assert q1.answer == "Denver Broncos"
    assert all(e.context[s:s + len(a)] == a for e in examples for a, s in zip(e.answers, e.answer_starts))


def test_limit_takes_first_n_in_file_order():
    assert [e.id for e in load_examples(str(SQUAD), "train", limit=2)] == ["q1", "q2"]


def test_hub_rows_flatten_like_the_file(examples):
    rows = [{"id": e.id, "title": e.title, "context": e.context, "question": e.question,
             "answers": {"text": list(e.answers), "answer_start": list(e.answer_starts)}} for e in examples]
    assert to_examples(((f"row {i}", row) for i, row in enumerate(rows)), "hub") == examples


def _bad(mutate):
    data = json.loads(SQUAD.read_text())
    mutate(data)
    return data


def _qa(d, a=0, p=0, q=0):
    return d["data"][a]["paragraphs"][p]["qas"][q]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("data"), "bad.json: missing field 'data'"),
    (lambda d: d["data"][0].pop("title"), "bad.json: data[0]: missing field 'title'"),
    (lambda d: d["data"][0]["paragraphs"][0].update(context="  "), "data[0].paragraphs[0]: field 'context' is empty"),
    (lambda d: d["data"][0]["paragraphs"][0].update(context=7), "field 'context' must be str, got int"),
    (lambda d: _qa(d).pop("question"), "question q1: missing field 'question'"),
    (lambda d: _qa(d).update(answers=[]), "question q1: field 'answers' is empty"),
    (lambda d: _qa(d)["answers"][1].update(answer_start="0"), "question q1, answers[1]: field 'answer_start' must be int"),
    (lambda d: _qa(d)["answers"][0].update(answer_start=5), "question q1, answers[0]: field 'answer_start'=5 does not point at 'Denver Broncos'"),
    (lambda d: _qa(d, q=1).update(id="q1"), "question q1: duplicate question id"),
])
def test_malformed_records_name_file_question_and_field(mutate, message):
    with pytest.raises(DataError, match=None) as err:
        parse_squad(_bad(mutate), "bad.json")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(DataError, match="nope.json: no such file"):
        load_squad_file(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"data": [')
    with pytest.raises(DataError, match=r"broken.json: not valid JSON \(line 1"):
        load_squad_file(broken)


def test_empty_after_limit_is_an_error(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"version": "1.1", "data": []}))
    with pytest.raises(DataError, match="no questions left"):
        load_examples(str(empty), "train")
