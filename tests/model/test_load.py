import pytest
import torch

from loraqa.model.load import _unmark_quantized, context_window, load_model, load_tokenizer, model_source


def test_model_source_kinds(tmp_path, monkeypatch):
    monkeypatch.setattr("loraqa.model.fetch.hub_reachable", lambda name, kind="models": True)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert model_source(str(gguf)) == (str(tmp_path), {"gguf_file": "m.gguf"})
    assert model_source("gpt2") == ("gpt2", {})
    assert model_source(str(tmp_path)) == (str(tmp_path), {})
    with pytest.raises(ValueError, match="no such .gguf file"):
        model_source(str(tmp_path / "x.gguf"))
    with pytest.raises(ValueError, match="a file, but not a .gguf"):
        (tmp_path / "weights.bin").write_bytes(b"")
        model_source(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="no such folder or file"):
        model_source("./missing/model")


def test_tokenizer_gets_pad_equal_to_eos(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    assert tok.pad_token_id == tok.eos_token_id is not None


def test_random_init_is_seeded_and_differs_from_pretrained(tiny_model_dir):
    a = load_model(str(tiny_model_dir), "random", seed=1)
    b = load_model(str(tiny_model_dir), "random", seed=1)
    c = load_model(str(tiny_model_dir), "random", seed=2)
    p = load_model(str(tiny_model_dir))
    w = lambda m: m.transformer.h[0].attn.c_attn.weight  # noqa: E731
    assert torch.equal(w(a), w(b)) and not torch.equal(w(a), w(c)) and not torch.equal(w(a), w(p))
    assert context_window(p) == 512


def test_gguf_quantization_marks_are_removed(tiny_model):
    class Quantizer:
        pass

    tiny_model.hf_quantizer = Quantizer()
    tiny_model.config.quantization_config = {"quant_method": "gguf"}
    _unmark_quantized(tiny_model)
    assert tiny_model.hf_quantizer is None and not tiny_model.is_quantized
    assert not hasattr(tiny_model.config, "quantization_config")
