import pytest

from loraqa.scoring.analysis import analyse, ANSWER_BUCKETS, bucket_label, CONTEXT_BUCKETS, question_type


@pytest.mark.parametrize("question, kind", [
    ("How many points did they score?", "how many/much"),
    ("How much did it cost?", "how many/much"),
    ("How did they win?", "how"),
    ("What team won?", "what"),
    ("In which year?", "which"),
    ("Whose idea was it?", "who"),
    ("The game was played where?", "where"),
    ("Name the team.", "other"),
    ("Somewhat odd, when?", "when"),   # whole words only: 'somewhat' is not 'what'
])
def test_question_type(question, kind):
    assert question_type(question) == kind


@pytest.mark.parametrize("n, answer, context", [(1, "1", "0-99"), (3, "2-3", "0-99"), (6, "4-6", "0-99"),
                                                (7, "7+", "0-99"), (150, "7+", "150-199"), (200, "7+", "200+")])
def test_buckets(n, answer, context):
    assert bucket_label(n, ANSWER_BUCKETS) == answer and bucket_label(n, CONTEXT_BUCKETS) == context


def test_analyse_fixture(examples):
    predictions = {"q1": "Denver Broncos", "q2": "", "q3": "24–10", "q4": "the Smith family", "q5": "1887",
                   "q6": "forty-two"}
    a = analyse(examples, predictions, worst=2)
    assert a["empty_prediction_share"] == pytest.approx(1 / 6)
    assert a["not_in_context_share"] == pytest.approx(1 / 6)          # "the Smith family"
    assert a["by_question_type"]["which"] == {"n": 1, "exact_match": 100.0, "f1": 100.0}
    assert a["by_question_type"]["where"] == {"n": 1, "exact_match": 0.0, "f1": 0.0}
    assert sum(b["n"] for b in a["by_question_type"].values()) == 6
    assert sum(b["n"] for b in a["by_context_words"].values()) == 6
    assert a["by_context_words"]["150-199"]["n"] == 2                  # the long mill context: q4, q5
    assert [w["id"] for w in a["worst"]] == ["q2", "q4"]
    assert a["worst"][1]["golds"] == ["the Müller family"] and "Müller" in a["worst"][1]["context"]
