"""The check before a path is trusted: a fast path that computes something else, or fails, hands
over to the next slower one, said in one line, and the answers stay transformers' own."""

import json

import pytest
import torch
from transformers import AttentionInterface

from loraqa.config import DEFAULT_TEMPLATE
from loraqa.data.features import build_eval_features
from loraqa.inference.generate import answer_text, predict, stop_token_ids
from loraqa.inference.paths import CHECKED, check_support, support_for
from loraqa.inference.settings import DecodeSettings
from loraqa.model.prefix_attention import NAME, NotMirrored
from loraqa.model.support import DecodingSupport

CPU = torch.device("cpu")


def _features(tokenizer, examples):
    return build_eval_features(tokenizer, examples, DEFAULT_TEMPLATE, 512, 6)[0]


def _generated(model, tokenizer, features):
    stops = stop_token_ids(tokenizer)
    out = {}
    for f in features:
        ids = torch.tensor([f.input_ids])
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                eos_token_id=stops, pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
        out[f.id] = answer_text(tokenizer, tokens.tolist())
    return out


def test_a_sound_path_is_kept_and_checked_once(tiny_model, tokenizer, examples, capsys):
    support = check_support(tiny_model, _features(tokenizer, examples), tokenizer.pad_token_id, 6)
    assert (support.path, support.checked) == ("shared", True)
    assert support_for(tiny_model) is support and "answered by" not in capsys.readouterr().err
    assert check_support(tiny_model, [], tokenizer.pad_token_id, 6) is support  # kept on the model


def test_a_shared_path_that_computes_something_else_hands_over_to_the_copies(tiny_model, tokenizer, examples,
                                                                              monkeypatch, capsys):
    """Here the shared-passage attention forgets the passage: the check sees other logits, the
    copies' path answers, and the answers are transformers' own."""
    real = AttentionInterface._global_mapping[NAME]

    def forgets_the_passage(module, query, key, value, mask, shared_prefix=None, **kw):
        if shared_prefix is not None:
            shared_prefix.bias = torch.full_like(shared_prefix.bias, torch.finfo(torch.float32).min)
        return real(module, query, key, value, mask, shared_prefix=shared_prefix, **kw)

    monkeypatch.setitem(AttentionInterface._global_mapping, NAME, forgets_the_passage)
    features = _features(tokenizer, examples)
    route = {}
    answers = predict(tiny_model, tokenizer, features, DecodeSettings(512, batch_size=4, max_new_tokens=6), CPU,
                      progress=False, route=route)
    assert route["path"] == "copies" and route["generate"] == 0
    err = capsys.readouterr().err
    assert err.count("answered by the copies path") == 1 and "differs from transformers' generate" in err
    assert answers == _generated(tiny_model, tokenizer, features)


def test_a_path_that_fails_hands_over_and_generate_is_the_last(tiny_model, tokenizer, examples, monkeypatch, capsys):
    """A model whose attention asks for what the shared path does not mirror (here: every call
    raises it), and whose copies fail too, is answered by transformers' generate."""
    from loraqa.inference import decoder

    def refuses(*args, **kwargs):
        raise NotMirrored("a position bias")

    monkeypatch.setattr(decoder, "_admit", refuses)
    features = _features(tokenizer, examples)
    route = {}
    answers = predict(tiny_model, tokenizer, features, DecodeSettings(512, max_new_tokens=6), CPU, progress=False,
                      route=route)
    err = capsys.readouterr().err
    assert "the shared path fails on it (NotMirrored: a position bias)" in err and "the copies path fails" in err
    assert route == {"path": "generate", "fast": 0, "generate": len(features)}
    assert answers == _generated(tiny_model, tokenizer, features)


def test_a_model_stored_in_bf16_is_not_checked_but_keeps_its_checked_path(tiny_model, tokenizer, examples):
    features = _features(tokenizer, examples)
    bf16 = tiny_model.to(torch.bfloat16)
    assert not check_support(bf16, features, tokenizer.pad_token_id, 6).checked  # bf16 logits say nothing exact
    setattr(bf16, CHECKED, DecodingSupport("copies", "checked earlier, in float32", checked=True))
    assert check_support(bf16, features, tokenizer.pad_token_id, 6).path == "copies"


def test_the_check_is_kept_in_the_cache_and_run_again_only_when_its_key_changes(tiny_model_dir, examples, tmp_path,
                                                                                 monkeypatch, own_cache):
    from conftest import make_adapter
    from loraqa.config import load_config
    from loraqa.inference import paths
    from loraqa.inference.answerer import load_answerer

    runs = []
    differs = paths._differs
    monkeypatch.setattr(paths, "_differs", lambda *a: runs.append(1) or differs(*a))
    adapter = make_adapter(tiny_model_dir, tmp_path / "a")
    config = load_config(None, {"model": str(tiny_model_dir), "max_new_tokens": 6, "precision": "fp32"})

    def answer(adapter_path):
        answerer = load_answerer(config, str(adapter_path), examples[:4])
        return predict(answerer.model, answerer.tokenizer, answerer.features(examples[:4])[0], answerer.settings, CPU,
                       "fp32")

    first = answer(adapter)
    recorded = [json.loads(f.read_text()) for f in (own_cache / "checks").iterdir()]
    assert len(runs) == 1 and sorted(r.get("path", "causal") for r in recorded) == ["causal", "shared"]
    assert answer(adapter) == first and len(runs) == 1  # recorded: not run again, the same answers
    make_adapter(tiny_model_dir, tmp_path / "b", seed=1)
    answer(tmp_path / "b")
    assert len(runs) == 2  # another adapter: checked
    monkeypatch.setattr("transformers.__version__", "0.0.0-other")
    answer(adapter)
    assert len(runs) == 3  # another transformers: checked
    make_adapter(tiny_model_dir, adapter, seed=2)  # the same folder, other weights
    answer(adapter)
    assert len(runs) == 4


def test_a_recorded_fallback_is_kept(tiny_model_dir, examples, monkeypatch, own_cache, capsys):
    from loraqa.config import load_config
    from loraqa.inference import paths
    from loraqa.inference.answerer import load_answerer

    monkeypatch.setattr(paths, "_differs", lambda model, sample, pad, support:
                        "differs (a test)" if support.path == "shared" else None)
    config = load_config(None, {"model": str(tiny_model_dir), "max_new_tokens": 6, "precision": "fp32"})
    assert support_for(load_answerer(config, None, examples[:4]).model).path == "copies"
    monkeypatch.setattr(paths, "_differs", lambda *a: pytest.fail("checked again"))
    support = support_for(load_answerer(config, None, examples[:4]).model)
    assert (support.path, support.checked) == ("copies", True) and "differs (a test)" in support.why
