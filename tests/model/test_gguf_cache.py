"""A GGUF file read once into loraqa's cache: the same model and tokenizer from the cache as from the
file, rebuilt when the file or the entry changes, read from the file when the cache cannot be written."""

import os

import pytest
import torch

from conftest import save_tiny_model
from loraqa.export.writer import write_model
from loraqa.model import gguf_cache
from loraqa.model.load import load_model, load_tokenizer, model_source

TEXT = "Context: the mill was rebuilt in 1846\nQuestion: when?\nAnswer:"


@pytest.fixture()
def tiny_gguf(tmp_path):
    model, tokenizer = save_tiny_model(tmp_path / "m", "llama")
    return write_model(model, tokenizer, tmp_path / "m.gguf", "f32", progress=False)


def _logits(model, tokenizer):
    with torch.no_grad():
        return model.eval()(tokenizer(TEXT, return_tensors="pt").input_ids).logits[0]


def _parses(monkeypatch) -> list:
    """The GGUF files gguf's reader parses from now on."""
    import gguf

    parsed, made = [], gguf.GGUFReader

    def counting(path, *args, **kwargs):
        parsed.append(os.fspath(path))
        return made(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    return parsed


def test_the_cache_gives_the_files_model_and_tokenizer_and_reads_the_file_once(tiny_gguf, own_cache, monkeypatch,
                                                                                capsys):
    parsed = _parses(monkeypatch)
    model, tokenizer = load_model(str(tiny_gguf)), load_tokenizer(str(tiny_gguf))
    assert parsed == [str(tiny_gguf)]  # the config, tokenizer and weights from one parse
    assert "MiB in all (`loraqa cache clear` frees it)" in capsys.readouterr().err  # its size, said
    entry = own_cache / "models"
    assert [p.name for p in entry.iterdir()] and model_source(str(tiny_gguf))[1] == {}
    reference, ref_tokenizer = gguf_cache.read_gguf(tiny_gguf)
    torch.testing.assert_close(_logits(model, tokenizer), _logits(reference, ref_tokenizer), rtol=0, atol=0)
    assert tokenizer(TEXT)["input_ids"] == ref_tokenizer(TEXT)["input_ids"]
    parsed.clear()
    load_model(str(tiny_gguf)), load_tokenizer(str(tiny_gguf))
    assert parsed == []  # a hit reads the folder


def test_a_changed_file_gets_its_own_entry(tiny_gguf, own_cache, tmp_path):
    first = model_source(str(tiny_gguf))[0]
    model, tokenizer = save_tiny_model(tmp_path / "other", "llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(2) if not model.config.tie_word_embeddings else model.model.embed_tokens.weight.mul_(2)
    write_model(model, tokenizer, tiny_gguf, "f32", progress=False)  # the same path, other weights
    second = model_source(str(tiny_gguf))[0]
    assert second != first
    torch.testing.assert_close(_logits(load_model(str(tiny_gguf)), tokenizer), _logits(model, tokenizer),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("damage", ["truncated weights", "missing tokenizer", "bad manifest"])
def test_a_damaged_entry_is_rebuilt(tiny_gguf, damage, capsys):
    entry = model_source(str(tiny_gguf))[0]
    expected = _logits(load_model(str(tiny_gguf)), load_tokenizer(str(tiny_gguf)))
    weights = os.path.join(entry, "model.safetensors")
    if damage == "truncated weights":
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) // 2)
    elif damage == "missing tokenizer":
        os.remove(os.path.join(entry, "tokenizer.json"))
    else:
        with open(os.path.join(entry, gguf_cache.MANIFEST), "w") as f:
            f.write("{not json")
    capsys.readouterr()
    assert model_source(str(tiny_gguf))[0] == entry
    assert "rebuilding it from" in capsys.readouterr().err
    torch.testing.assert_close(_logits(load_model(str(tiny_gguf)), load_tokenizer(str(tiny_gguf))), expected,
                               rtol=0, atol=0)


def test_a_cache_that_cannot_be_written_reads_the_file_and_says_so_in_one_line(tiny_gguf, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf_cache, "_save", full)
    location, kwargs = model_source(str(tiny_gguf))
    assert kwargs == {"gguf_file": tiny_gguf.name}
    err = capsys.readouterr().err.strip().splitlines()
    assert any("cannot write" in line and "No space left on device" in line and "read from the GGUF file" in line
               for line in err)
    reference, ref_tokenizer = gguf_cache.read_gguf(tiny_gguf)
    torch.testing.assert_close(_logits(load_model(str(tiny_gguf)), ref_tokenizer), _logits(reference, ref_tokenizer),
                               rtol=0, atol=0)


def test_cache_clear_frees_the_entries_and_keeps_downloads(tiny_gguf, own_cache, capsys):
    from loraqa.cli import main

    model_source(str(tiny_gguf))
    (own_cache / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"downloaded")
    assert main(["cache"]) == 0 and " MiB in " in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert not (own_cache / "models").exists() and (own_cache / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
