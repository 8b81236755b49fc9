"""Rows of a document's question that cannot be chosen end early (inference/rivals.py): the answers
chosen across windows are the ones every row decoded to its end gives, in fewer steps."""

import torch
from conftest import LONG_DOCUMENT, LONG_DOCUMENT_QUESTIONS

from loraqa.config import DEFAULT_TEMPLATE
from loraqa.data.examples import Example
from loraqa.inference import generate
from loraqa.inference.documents import read
from loraqa.inference.rivals import Rivals
from loraqa.inference.settings import DecodeSettings



def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_row_sure_to_answer_ends_the_rows_ranked_after_it(tokenizer):
    # three windows of question "q": ranks 0, 1, 2 by BM25; another question's row beside them
    rivals = Rivals(tokenizer, {0: ("q", 0), 1: ("q", 1), 2: ("q", 2), 3: ("r", 0)})
    word, space = _ids(tokenizer, " mill"), _ids(tokenizer, " ")
    tags, watched = [0, 1, 2, 3], [0.4, 0.2, 0.3, 0.9]
    assert rivals(tags, [space, space, space, space], watched) == []  # a space alone may still end empty
    # row 2 (no-answer 0.3) is sure: row 0 (0.4) cannot win; row 1 (0.2) still can; "r" is not its rival
    assert rivals(tags, [space, space, word, word], watched) == [0]
    assert rivals([1, 2, 3], [word, word, word], [0.2, 0.3, 0.9]) == [1]  # row 1 answers: row 2 has lost


def test_ties_go_to_the_window_ranked_first_and_ended_rows_count(tokenizer):
    rivals = Rivals(tokenizer, {0: ("q", 0), 1: ("q", 1), 2: ("q", 2)})
    rivals.ended(1, "1887", 0.5)   # row 1 ended with an answer
    rivals.ended(2, "", 0.1)       # row 2 abstained: it is no rival
    assert rivals([0], [[]], [0.5]) == []  # same probability, ranked before row 1: it may still win
    assert Rivals(tokenizer, {0: ("q", 1), 1: ("q", 0)})([0, 1], [_ids(tokenizer, " a")] * 2, [0.5, 0.5]) == [0]


def test_a_half_decoded_character_or_a_phrase_is_not_yet_an_answer(tokenizer):
    half = _ids(tokenizer, "é")[:1]  # the first byte of a two-byte character
    assert "\ufffd" in tokenizer.decode(half)
    assert Rivals(tokenizer, {0: ("q", 0), 1: ("q", 1)})([0, 1], [half, half], [0.1, 0.2]) == []
    word = _ids(tokenizer, " unknown")
    # with a no-answer phrase, "unknown" may be it: only an ended row's answer counts
    assert Rivals(tokenizer, {0: ("q", 0), 1: ("q", 1)}, phrase=True)([0, 1], [word, word], [0.1, 0.2]) == []
    # over --na-prob-thresh a row abstains whatever it says
    assert Rivals(tokenizer, {0: ("q", 0), 1: ("q", 1)}, na_thresh=0.05)([0, 1], [word, word], [0.1, 0.2]) == []


def test_windows_answer_as_if_every_row_decoded_to_its_end(tiny_model, tokenizer, monkeypatch):
    """The real decoder on a long document, each question in 3 windows: with rivals ended early, the
    chosen answers, their sources and no-answer probabilities are those of full decoding."""
    settings = DecodeSettings(512, DEFAULT_TEMPLATE, max_new_tokens=12, batch_size=8, window_tokens=120,
                              doc_stride=30, windows_per_question=3)
    examples = [Example(str(n), "", LONG_DOCUMENT, q, ()) for n, q in enumerate(LONG_DOCUMENT_QUESTIONS)]
    made = []
    monkeypatch.setattr(generate, "Rivals", type("Spy", (Rivals,), {
        "of": classmethod(lambda cls, *a: made.append(Rivals.of(*a)) or made[-1])}))
    early = read(tiny_model, tokenizer, examples, settings, torch.device("cpu"), "fp32")
    monkeypatch.setattr(generate.Rivals, "of", classmethod(lambda cls, *a: None))
    full = read(tiny_model, tokenizer, examples, settings, torch.device("cpu"), "fp32")
    assert made[0].cut  # rows did end early (a random model's rows all answer)
    assert early.answers == full.answers and early.na_probs == full.na_probs and early.sources == full.sources
