"""llama.cpp itself reads loraqa's GGUF files: the same token ids, the same next-token logits.
Runs where llama-cpp-python is installed (it builds llama.cpp from source: ~15 minutes on 2 cores,
so CI does not install it); skips, saying so, elsewhere."""

import numpy as np
import pytest
import torch

from export.test_gguf import HARD, _tiny
from loraqa.export.writer import write_model

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                                   "(pip install llama-cpp-python builds llama.cpp, ~15 minutes)")


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
