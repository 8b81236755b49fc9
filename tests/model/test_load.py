import pytest
import torch

from loraqa.io import HubAnswer
from loraqa.model.load import context_window, load_model, load_tokenizer, model_source, unmark_quantized


def test_model_source_kinds(tmp_path, monkeypatch):
    monkeypatch.setattr("loraqa.model.fetch.hub_status", lambda name, kind="models": HubAnswer("ok"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"m.gguf: cannot read it as a GGUF model"):
        model_source(str(gguf))
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
    unmark_quantized(tiny_model)
    assert tiny_model.hf_quantizer is None and not tiny_model.is_quantized
    assert not hasattr(tiny_model.config, "quantization_config")


def test_a_folder_tokenizes_as_its_tokenizer_json_says_whatever_the_model_type(tmp_path, capsys):
    """transformers 5 would give a Qwen2 folder Qwen2Tokenizer, whose pre-tokenizer is not the
    saved one: loraqa loads the file as saved, and says so."""
    from conftest import build_tokenizer
    from families import FAMILIES

    tok = build_tokenizer()
    for family in (f for f in FAMILIES if f.id in ("qwen2", "llama")):
        folder = tmp_path / family.id
        family.build(tok).save_pretrained(folder)
        tok.save_pretrained(folder)
        text = "The Broncos' 24–10 win, 1,234 years: état...   spaced\nnew"
        assert load_tokenizer(str(folder))(text)["input_ids"] == tok(text)["input_ids"], family.id
    err = capsys.readouterr().err
    assert err.count("used as saved") == 1 and "model type qwen2" in err  # llama's needs nothing


def test_a_model_that_is_not_causal_is_refused_in_one_line(tmp_path, capsys):
    """An encoder offered as a causal LM (BERT without is_decoder) attends to later tokens."""
    from conftest import build_tokenizer
    from transformers import BertConfig, BertLMHeadModel

    from loraqa.cli import main

    tok = build_tokenizer()
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, is_decoder=False)
    BertLMHeadModel(config).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    assert main(["ask", "--model", str(tmp_path / "bert"), "--context", "Denver won.", "--question", "Who won?"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("not a causal LM (bert attends to later tokens); loraqa fine-tunes causal LMs")
    assert "Traceback" not in "\n".join(err)
