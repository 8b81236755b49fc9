"""Official SQuAD v2.0 scoring on a tiny set whose every number is worked out by hand below."""

import pytest

from loraqa.scoring.squad_v2 import compute_exact, compute_f1, find_best_thresh, gold_answers, squad_v2_scores

# a, b, e have answers (e's only gold is punctuation, so it counts as gold ""); c, d have none.
GOLDS = {"a": ["Denver Broncos", "The Denver Broncos"], "b": ["Paris"], "c": [], "d": [], "e": ["!!!"]}
PREDS = {"a": "Denver", "b": "", "c": "", "d": "London", "e": ""}
#          exact  f1                                     has answer (script: bool(answers))
#   a        0    2/3  (1 of 2 gold tokens: p=1, r=1/2)   yes
#   b        0    0    (empty prediction, gold has tokens) yes
#   c        1    1    (empty vs empty)                   no
#   d        0    0                                       no
#   e        1    1    (gold '!!!' -> '')                 yes
NA_PROBS = {"a": 0.1, "b": 0.9, "c": 0.8, "d": 0.7, "e": 0.2}


def test_per_question_rules():
    assert gold_answers(["!!!", "the", " "]) == [""] and gold_answers(["A", "B", "."]) == ["B"]  # "A" is an article
    assert compute_f1("", "") == 1 and compute_f1("the", "") == 1   # both no tokens
    assert compute_f1("Paris", "") == 0 and compute_f1("", "Paris") == 0
    assert compute_exact("The Paris!", "paris") == 1
    assert compute_f1("Denver Broncos", "Denver") == pytest.approx(2 / 3)


def test_totals_and_has_ans_no_ans_splits():
    s = squad_v2_scores(GOLDS, PREDS)
    assert list(s) == ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total",
                       "NoAns_exact", "NoAns_f1", "NoAns_total"]
    assert s["exact"] == pytest.approx(100 * 2 / 5)                   # c, e
    assert s["f1"] == pytest.approx(100 * (2 / 3 + 1 + 1) / 5)        # 53.33
    assert s["total"] == 5
    assert s["HasAns_exact"] == pytest.approx(100 / 3)                # e of a, b, e
    assert s["HasAns_f1"] == pytest.approx(100 * (2 / 3 + 1) / 3)     # 55.56
    assert (s["NoAns_exact"], s["NoAns_f1"], s["HasAns_total"], s["NoAns_total"]) == (50.0, 50.0, 3, 2)


def test_splits_only_when_present():
    s = squad_v2_scores({"x": ["Paris"]}, {"x": "paris"})
    assert s == {"exact": 100.0, "f1": 100.0, "total": 1, "HasAns_exact": 100.0, "HasAns_f1": 100.0, "HasAns_total": 1}


def test_threshold_and_best_thresholds():
    s = squad_v2_scores(GOLDS, PREDS, NA_PROBS, na_prob_thresh=0.5)
    # above 0.5: b (has an answer -> 0), c and d (no answer -> 1); a and e keep their scores
    assert s["exact"] == pytest.approx(100 * 3 / 5)                   # c, d, e
    assert s["f1"] == pytest.approx(100 * (2 / 3 + 3) / 5)            # 73.33
    assert (s["NoAns_exact"], s["HasAns_exact"]) == (100.0, pytest.approx(100 / 3))
    # sweep in probability order a .1, e .2, d .7, c .8, b .9, starting at 2 (c, d have no answer):
    #   exact: a +0 = 2, e +1 = 3 (best, .2), d -1 ('London') = 2, c +0 ('') = 2, b +0 = 2  -> 3/5
    #   f1:    a +2/3 = 2.67 (best, .1), e +1 = 3.67 (best, .2), d -1, c 0, b 0          -> 3.67/5
    assert s["best_exact"] == pytest.approx(60.0) and s["best_exact_thresh"] == 0.2
    assert s["best_f1"] == pytest.approx(100 * (3 + 2 / 3) / 5) and s["best_f1_thresh"] == 0.2


def test_best_threshold_keeps_the_start_when_nothing_beats_it():
    # one unanswerable question answered ' ': the raw string is non-empty, so the script counts -1
    best, thresh = find_best_thresh({"x": " "}, {"x": 1}, {"x": 0.5}, {"x": False})
    assert (best, thresh) == (100.0, 0.0)


def test_default_threshold_one_never_predicts_no_answer():
    assert squad_v2_scores(GOLDS, PREDS, {k: 1.0 for k in PREDS})["exact"] == pytest.approx(40.0)


def test_missing_predictions_are_left_out_as_the_script_does():
    preds = {k: v for k, v in PREDS.items() if k != "d"}
    s = squad_v2_scores(GOLDS, preds)
    assert s["total"] == 4 and s["exact"] == pytest.approx(100 * 2 / 4)  # c, e of a, b, c, e
    assert (s["HasAns_total"], s["NoAns_total"], s["NoAns_exact"]) == (3, 1, 100.0)


def test_na_probs_must_cover_the_predictions():
    with pytest.raises(ValueError, match="no no-answer probability for 1 predicted questions, e.g. e"):
        squad_v2_scores(GOLDS, PREDS, {k: 0.0 for k in "abcd"})
