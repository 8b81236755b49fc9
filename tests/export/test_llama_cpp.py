"""What loraqa's GGUF files mean, read back by something else than their writer: llama.cpp itself (the
same token ids, the same next-token logits) where llama-cpp-python is installed (it builds llama.cpp
from source: ~15 minutes on 2 cores, so CI does not install it; that test skips, saying so), and
everywhere transformers' GGUF reader, which de-quantises what it reads."""

import json

import numpy as np
import pytest
import torch

from conftest import SQUAD
from export.test_gguf import HARD, _adapter, _tiny
from loraqa.cli import main
from loraqa.export.writer import write_model
from loraqa.model.load import load_model

try:
    import llama_cpp
except ImportError:
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed "
                                     "(pip install llama-cpp-python builds llama.cpp, ~15 minutes)")


@needs_llama_cpp
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_llama_cpp_tokenises_and_computes_as_transformers(arch, tmp_path):
    model, tok = _tiny(arch, tmp_path / "m")
    path = write_model(model, tok, tmp_path / "m.gguf", "f32", progress=False)
    # an f32 KV cache (llama.cpp's default is f16): then Llama's logits are transformers' to the bit here
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)
    for text in HARD:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"], text
    ids = tok("Context: the mill was rebuilt in 1887\nQuestion: when?\nAnswer:")["input_ids"]
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(theirs, ours, atol=5e-3)  # GPT-2's graph differs in the last bits (~2e-3)
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()
    llm.close()


# hyperparameters away from transformers' defaults, so a field the file lacks or misnames reads back wrong
UNUSUAL = {"gpt2": {"layer_norm_epsilon": 1e-3}, "llama": {"rms_norm_eps": 1e-3, "rope_theta": 500.0}}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_an_f16_export_of_base_and_adapter_is_the_merged_model_rounded_to_f16(arch, tmp_path):
    """``loraqa export --adapter --outtype f16`` read back by transformers: the merged model with each
    matrix rounded to f16 (norms, biases and GPT-2's positions stay f32, as the writer keeps them) and
    its hyperparameters: the same logits and the same greedy answers."""
    from peft import PeftModel

    from loraqa.config import Config
    from loraqa.data.squad import load_squad_file
    from loraqa.inference.answerer import ask
    from loraqa.model.lora import merge_lora

    _, tok = _tiny(arch, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    for key, value in UNUSUAL[arch].items():
        (config.get("rope_parameters", {}) if key == "rope_theta" else config)[key] = value
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    adapter = _adapter(tmp_path / "m", tmp_path / "adapter")
    out = tmp_path / "out" / "model.gguf"
    assert main(["export", "--model", str(tmp_path / "m"), "--adapter", str(adapter), "--output", str(out),
                 "--outtype", "f16", "--quiet"]) == 0

    merged = merge_lora(PeftModel.from_pretrained(load_model(str(tmp_path / "m")), str(adapter))).eval()
    with torch.no_grad():
        for name, p in merged.named_parameters():
            if p.dim() > 1 and "wpe" not in name:
                p.copy_(p.half().float())
    merged.save_pretrained(tmp_path / "rounded")
    tok.save_pretrained(tmp_path / "rounded")
    back = load_model(str(out)).eval()
    ids = torch.tensor([tok("Context: the mill was rebuilt in 1887\nQuestion: when?\nAnswer:")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, merged(ids).logits, atol=1e-5, rtol=0)
    read = back.config.to_dict()
    assert {k: read.get("rope_parameters", {}).get(k) if k == "rope_theta" else read[k]
            for k in UNUSUAL[arch]} == pytest.approx(UNUSUAL[arch])

    examples = load_squad_file(SQUAD)
    settings = {"max_new_tokens": 6, "precision": "fp32", "max_length": 256}
    exported = ask(Config(model=str(out), **settings), None, examples)
    assert exported == ask(Config(model=str(tmp_path / "rounded"), **settings), None, examples)
    assert len(set(exported.values())) > 1  # answers, not one repeated
