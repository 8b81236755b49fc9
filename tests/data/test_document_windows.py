"""Windows of a long document, SQuAD as whole documents, and the training windows of a reader for
documents (data/documents.py)."""

import pytest
from conftest import SQUAD, build_tokenizer

from loraqa.data.documents import document_level, document_windows, split_windows
from loraqa.data.load import sample_file
from loraqa.data.squad import load_squad_file


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def document():
    """The bundled sample's first article, its paragraphs joined: thousands of tokens."""
    return document_level(load_squad_file(sample_file("eval")))[0].context


@pytest.mark.parametrize("size, overlap", [(200, 40), (97, 0), (64, 32)])
def test_windows_cover_the_document_overlap_and_fit(tokenizer, document, size, overlap):
    windows = split_windows(tokenizer, document, size, overlap)
    assert len(windows) > 3 and windows[0][0] == 0 and windows[-1][1] == len(document)
    for (s0, e0), (s1, e1) in zip(windows, windows[1:]):
        assert s0 < s1 and e0 < e1 and s1 <= e0  # in order, no gap: every character in some window
        if overlap:
            assert s1 < e0  # neighbours share text
    # at most the size (a window's text tokenised alone may differ by a token at its edges)
    assert max(len(tokenizer(document[s:e], add_special_tokens=False)["input_ids"]) for s, e in windows) <= size + 2


def test_a_document_that_fits_is_one_window(tokenizer):
    assert split_windows(tokenizer, "A short passage. Two sentences.", 50, 10) == [(0, 31)]
    with pytest.raises(ValueError, match="cannot overlap"):
        split_windows(tokenizer, "text", 10, 10)


def test_document_level_offsets_index_the_document():
    examples = load_squad_file(SQUAD)
    whole = document_level(examples)
    titles = {ex.title for ex in examples}
    assert len({ex.context for ex in whole}) == len(titles)  # one document per article
    for ex, doc in zip(examples, whole):
        assert ex.context in doc.context and doc.id == ex.id and doc.answers == ex.answers
        for answer, start in zip(doc.answers, doc.answer_starts):
            assert doc.context[start:start + len(answer)] == answer


def test_training_windows_hold_the_answer_and_the_negatives_do_not(tokenizer):
    examples = load_squad_file(sample_file("train"))[:30]
    ranked = []

    def rank(question, texts):  # the order BM25 would give; here: the last first
        ranked.append(question)
        return list(range(len(texts)))[::-1]

    out = document_windows(tokenizer, examples, 96, 24, 1, rank)
    positives = [ex for ex in out if ex.answerable]
    negatives = [ex for ex in out if not ex.answerable]
    assert len(positives) == len(examples) and 0 < len(negatives) <= len(examples) and ranked
    for ex in positives:
        assert ex.context[ex.answer_starts[0]:ex.answer_starts[0] + len(ex.answer)] == ex.answer
    documents = {ex.id: doc.context for ex, doc in zip(examples, document_level(examples))}
    windows = {ex.id: ex.context for ex in positives}
    for neg in negatives:
        qid = neg.id.split("-not-")[0]
        assert neg.context in documents[qid] and neg.context != windows[qid]  # another window of its document
