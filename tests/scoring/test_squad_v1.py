import pytest

from loraqa.scoring.squad_v1 import exact_match_score, f1_score, normalize_answer, score_question, squad_scores


@pytest.mark.parametrize("raw, normal", [
    ("The Denver Broncos", "denver broncos"),
    ("  a  cat,   an apple; the end. ", "cat apple end"),
    ("Theory", "theory"),               # articles only as whole words
    ("anthem", "anthem"),
    ("U.S.A.", "usa"),
    ("24–10", "24–10"),                 # en dash is not ASCII punctuation: kept, as officially
    ("Müller's", "müllers"),
    ("\"forty-two\"", "fortytwo"),
    ("the", ""),
    ("", ""),
])
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


@pytest.mark.parametrize("pred, gold, em, f1", [
    ("Denver Broncos", "The Denver Broncos", 1.0, 1.0),
    ("Broncos", "Denver Broncos", 0.0, 2 * (1.0 * 0.5) / 1.5),
    ("the the", "the", 1.0, 0.0),       # both normalise to empty: EM 1, F1 0 (no common token)
    ("x b b", "b b c", 0.0, 2 / 3),      # token bags: b counted twice; P = R = 2/3
    ("a b b", "b b c", 0.0, 0.8),        # "a" is an article: P = 2/2, R = 2/3
    ("", "Denver", 0.0, 0.0),
    ("santa clara california", "Santa Clara, California.", 1.0, 1.0),
])
def test_em_and_f1(pred, gold, em, f1):
    assert exact_match_score(pred, gold) == em
    assert f1_score(pred, gold) == pytest.approx(f1, abs=1e-12)


def test_max_over_all_gold_answers():
    em, f1 = score_question("Levi's Stadium", ["Levi's Stadium in Santa Clara", "Levis Stadium"])
    assert (em, f1) == (1.0, 1.0)


def test_mean_over_all_questions_counts_missing_as_zero():
    golds = {"a": ["x"], "b": ["y z"], "c": ["w"], "d": ["v"]}
    scores = squad_scores(golds, {"a": "x", "b": "y", "extra": "ignored"})
    assert scores["n_questions"] == 4 and scores["n_unanswered"] == 2
    assert scores["exact_match"] == pytest.approx(25.0)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 4)
