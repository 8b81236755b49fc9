"""Questions about passages longer than a window (inference/documents.py): a passage that fits is
answered exactly as before; a longer one is read in the windows BM25 ranks first for the question,
and the answer of the window least likely to hold none is chosen, with where it came from."""

import pytest
import torch
from conftest import LONG_DOCUMENT, LONG_DOCUMENT_QUESTIONS, SQUAD

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


def _window_features(tokenizer, questions, settings):
    examples = [Example(str(n), "", DOCUMENT, q, ()) for n, q in enumerate(questions)]
    asked = documents.plan(tokenizer, examples, settings)
    features, _ = build_eval_features(tokenizer, asked.asked, DEFAULT_TEMPLATE, 512, 6)
    return documents.mark_windows(tokenizer, features, asked, DEFAULT_TEMPLATE), asked


QUESTIONS = LONG_DOCUMENT_QUESTIONS


def test_a_window_question_shares_its_window_part_and_no_more(tokenizer):
    features, asked = _window_features(tokenizer, QUESTIONS, _settings())
    parts = {}
    for f in features:
        window = next(ex.context for ex in asked.asked if ex.id == f.id)
        part = tokenizer.decode(f.input_ids[:f.n_context])
        assert part.rstrip(" ").endswith(f"{window}\nQuestion:") and f.n_context < f.n_prompt
        assert parts.setdefault(window, part) == part  # the same part for every question about the window
    assert len(parts) > 1


def test_kept_windows_give_the_answers_of_the_windows_read_again(tiny_model, tokenizer):
    """A second reading of the same windows takes every one from the store: the same answers and
    no-answer probabilities, each window's prefill skipped."""
    from loraqa.model.passage_store import PassageStore

    settings = _settings()
    features, _ = _window_features(tokenizer, QUESTIONS, settings)
    cpu, store, fresh_probs, probs = torch.device("cpu"), PassageStore(), {}, {}
    fresh = predict(tiny_model, tokenizer, features, settings, cpu, progress=False, na_probs=fresh_probs)
    assert predict(tiny_model, tokenizer, features, settings, cpu, progress=False, passages=store, na_probs={}) == fresh
    windows = store.misses  # each batch's passages: here windows (or the part two windows begin with)
    assert store.hits == 0 and windows == len(store.entries) >= 3
    assert predict(tiny_model, tokenizer, features, settings, cpu, progress=False, passages=store,
                   na_probs=probs) == fresh
    assert store.hits == windows and probs == fresh_probs


def test_a_batch_of_kept_and_new_windows_reads_each_as_it_would_alone(tiny_model, tokenizer):
    """Some passages from the store, the others prefilled (cut to their own width): every passage's
    keys and values those of all of them prefilled together, to float32's last bits (another batch)."""
    from loraqa.data.batching import collate_shared_prefix, shared_prefix_batches
    from loraqa.model.passage_store import PassageStore, read_passages
    from loraqa.model.prefix_attention import prefix_attention

    features, _ = _window_features(tokenizer, QUESTIONS, _settings())
    t = collate_shared_prefix(shared_prefix_batches(features, 64)[0], tokenizer.pad_token_id)
    order = t["prefix_mask"].sum(-1).argsort(descending=True, stable=True)
    ids, mask = t["prefix_ids"][order], t["prefix_mask"][order]
    groups, width = ids.shape
    lengths = mask.sum(-1).tolist()
    assert groups >= 3 and lengths[1] < width  # a first new passage narrower than the batch
    store = PassageStore()
    with torch.inference_mode(), prefix_attention(tiny_model):
        together = read_passages(tiny_model, tiny_model, ids, mask, mask.clone(), groups, None, None, None)
        read_passages(tiny_model, tiny_model, ids[:1], mask[:1], mask[:1].clone(), 1, None, store, [True])
        mixed = read_passages(tiny_model, tiny_model, ids, mask, mask.clone(), groups, None, store,
                                       [True] * groups)
    assert store.hits == 1 and store.misses == groups
    for a, b in zip(together, mixed):
        for layer_a, layer_b in zip(a, b):
            for g, n in enumerate(lengths):
                torch.testing.assert_close(layer_b[g, :, width - n:], layer_a[g, :, width - n:], rtol=1e-5, atol=1e-5)


def test_the_store_keeps_to_its_budget_least_recently_used_out(tiny_model, tokenizer):
    from loraqa.model.passage_store import PassageStore

    settings = _settings()
    features, _ = _window_features(tokenizer, QUESTIONS, settings)
    one = PassageStore()
    fresh = predict(tiny_model, tokenizer, features, settings, torch.device("cpu"), progress=False, passages=one)
    window = max(kept.size for kept in one.entries.values())
    small = PassageStore(budget=2 * window)
    assert predict(tiny_model, tokenizer, features, settings, torch.device("cpu"), progress=False,
                   passages=small) == fresh
    assert small.bytes <= 2 * window and small.evictions > 0 and len(small.entries) < len(one.entries)
    small.drop("__base__")
    assert not small.entries and small.bytes == 0
