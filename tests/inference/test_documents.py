"""Questions about passages longer than a window (inference/documents.py): a passage that fits is
answered exactly as before; a longer one is read in the windows BM25 ranks first for the question,
and the answer of the window least likely to hold none is chosen, with where it came from."""

import pytest
import torch
from conftest import LONG_DOCUMENT, SQUAD

from loraqa.config import DEFAULT_TEMPLATE
from loraqa.data.documents import split_windows
from loraqa.data.examples import Example
from loraqa.data.features import build_eval_features
from loraqa.data.squad import load_squad_file
from loraqa.inference import documents
from loraqa.inference.documents import SEP, rank, read, window_size
from loraqa.inference.generate import predict
from loraqa.inference.settings import DecodeSettings

DOCUMENT = LONG_DOCUMENT  # the answer in its last window


def _settings(**kw):
    return DecodeSettings(512, DEFAULT_TEMPLATE, max_new_tokens=6, batch_size=8, window_tokens=120, doc_stride=30, **kw)


def test_a_passage_that_fits_a_window_is_answered_as_before(tiny_model, tokenizer):
    examples = load_squad_file(SQUAD)
    settings = DecodeSettings(512, DEFAULT_TEMPLATE, max_new_tokens=6, batch_size=4)
    features, _ = build_eval_features(tokenizer, examples, DEFAULT_TEMPLATE, 512, 6)
    before = predict(tiny_model, tokenizer, features, settings, torch.device("cpu"), progress=False)
    done = read(tiny_model, tokenizer, examples, settings, torch.device("cpu"), "fp32")
    assert done.answers == before and not done.sources and done.documents == 0


def test_bm25_puts_the_window_with_the_questions_words_first(tokenizer):
    windows = split_windows(tokenizer, DOCUMENT, 120, 30)
    texts = [DOCUMENT[s:e] for s, e in windows]
    mill, stop_words = rank(["When was the mill rebuilt?", "the of and"], texts, 2)  # one index for both
    assert mill[0] == len(windows) - 1
    assert stop_words == [0, 1]  # stop words alone: the first windows


def _stub(monkeypatch, answer_in):
    """predict answering "1887" (no-answer probability 0.1) in a window that holds it, else ""
    (0.9); the ids of what it was asked."""
    asked = []

    def fake(model, tokenizer, features, settings, device, precision="fp32", *, contexts, na_probs, **kw):
        asked.extend(f.id for f in features)
        answers = {f.id: answer_in(contexts[f.id]) for f in features}
        na_probs.update({f.id: 0.1 if answers[f.id] else 0.9 for f in features})
        return answers

    monkeypatch.setattr(documents, "predict", fake)
    return asked


def test_an_answer_in_the_last_window_is_found_with_where_it_came_from(tokenizer, monkeypatch):
    asked = _stub(monkeypatch, lambda context: "1887" if "1887" in context else "")
    ex = Example("q", "", DOCUMENT, "When was the mill rebuilt?", ())
    done = read(None, tokenizer, [ex], _settings(), torch.device("cpu"), "fp32")
    windows = split_windows(tokenizer, DOCUMENT, window_size(tokenizer, _settings()), 30)
    source = done.sources["q"]
    assert done.answers["q"] == "1887" and source.window == len(windows) - 1
    assert DOCUMENT[source.start:source.end] == "1887" and (source.window_start, source.window_end) == windows[-1]
    assert source.score == pytest.approx(0.9) and done.na_probs["q"] == pytest.approx(0.1)
    assert len(asked) == 3 and all(a.startswith(f"q{SEP}") for a in asked)  # three windows, not all of them
    assert done.documents == 1 and done.windows == len(windows) > 3


def test_a_document_that_does_not_answer_is_not_found(tokenizer, monkeypatch):
    _stub(monkeypatch, lambda context: "")
    ex = Example("q", "", DOCUMENT, "Who built the lighthouse?", ())
    done = read(None, tokenizer, [ex], _settings(), torch.device("cpu"), "fp32")
    assert done.answers["q"] == "" and done.na_probs["q"] == pytest.approx(0.9)
    assert done.sources["q"].start is None and done.sources["q"].windows_read == 3


def test_a_long_passage_is_read_in_windows_by_the_model(tiny_model, tokenizer, capsys):
    """The real decoder: each window's answer, one chosen; its offsets index the document."""
    examples = [Example(str(n), "", DOCUMENT, q, ()) for n, q in enumerate(
        ["When was the mill rebuilt?", "Who rebuilt the mill?", "What tells of the river?"])]
    done = read(tiny_model, tokenizer, examples, _settings(), torch.device("cpu"), "fp32")
    assert set(done.answers) == {"0", "1", "2"} and set(done.sources) == {"0", "1", "2"}
    for ex in examples:  # the chosen window's own answer, as that window alone gives it
        source = done.sources[ex.id]
        alone = Example("w", "", DOCUMENT[source.window_start:source.window_end], ex.question, ())
        assert done.answers[ex.id] == read(tiny_model, tokenizer, [alone], _settings(), torch.device("cpu"),
                                           "fp32").answers["w"]
        if source.start is not None:
            assert DOCUMENT[source.start:source.end] == done.answers[ex.id]
    assert "3 question(s) about 1 passage(s) longer than a window" in capsys.readouterr().err


def test_evaluate_document_level_asks_each_question_about_its_whole_article(tiny_model_dir, tmp_path):
    from loraqa.config import load_config
    from loraqa.evaluate import run_evaluate

    common = {"model": str(tiny_model_dir), "eval_file": str(SQUAD), "precision": "fp32", "max_new_tokens": 4,
              "window_tokens": 60, "doc_stride": 15}
    paragraph = run_evaluate(load_config(None, {**common, "output_dir": str(tmp_path / "p")}), progress=False)
    document = run_evaluate(load_config(None, {**common, "output_dir": str(tmp_path / "d"), "document_level": True}),
                            progress=False)
    assert paragraph["n_questions"] == document["n_questions"] == len(load_squad_file(SQUAD))
    assert document["documents_in_windows"] >= 1 and document["window_questions"] > document["documents_in_windows"]
    assert document["windows"] > paragraph["windows"]


def test_training_for_documents_adds_windows_without_the_answer(tiny_model_dir, tmp_path, capsys):
    import json

    from loraqa.cli import main

    assert main(["train", "--model", str(tiny_model_dir), "--train-file", str(SQUAD), "--eval-file", str(SQUAD),
                 "--epochs", "1", "--max-length", "256", "--window-tokens", "60", "--doc-stride", "15",
                 "--negative-windows", "1", "--precision", "fp32", "--max-new-tokens", "4", "--quiet",
                 "--output-dir", str(tmp_path / "run")]) == 0
    n = len(load_squad_file(SQUAD))
    assert f"{n} answerable, {n} windows that do not hold the answer" in capsys.readouterr().err
    saved = json.loads((tmp_path / "run" / "adapter" / "loraqa.json").read_text())
    assert saved["window_tokens"] == 60 and saved["windows_per_question"] == 3  # answering reads as it trained
