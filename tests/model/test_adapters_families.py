"""Mixed-adapter batches on every family of tests/families.py, with ``all-linear`` targets (so the
MLPs that see their tokens flattened to (tokens, width), OPT's fc1/fc2 and Qwen2-MoE's shared
expert, are adapted too): each row of a prefill and of a decoding step's shape computes what PEFT
computes for its own adapter alone, or, where a layer's tokens cannot be told apart by row, the set
says it cannot mix and never does."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tokenizer, save_family_adapter
from families import FAMILIES

from loraqa.config import Config
from loraqa.model.adapters import AdapterSet
from loraqa.model.multilora import BASE, routing


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _linears(model) -> list[str]:
    """Every linear layer's full name but the head's: ``all-linear`` without the experts' fused
    parameters (full names: PEFT 0.22 also takes a short name such as down_proj for the experts'
    parameter of that name)."""
    from transformers.pytorch_utils import Conv1D

    return sorted(n for n, m in model.named_modules()
                  if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not model.get_output_embeddings())


def _alone(family, tokenizer, path, ids) -> torch.Tensor:
    from peft import PeftModel

    with torch.no_grad():
        return PeftModel.from_pretrained(family.build(tokenizer), path).eval()(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES, ids=[f.id for f in FAMILIES])
def test_mixed_rows_equal_each_adapter_alone(family, tokenizer, tmp_path):
    paths = {name: save_family_adapter(family, tokenizer, tmp_path / name, seed) for seed, name in enumerate("ab", 1)}
    model = family.build(tokenizer)
    served = AdapterSet(model, Config(model="tiny"), "tiny")
    from peft import PeftConfig

    if PeftConfig.from_pretrained(paths["a"]).target_parameters:  # a mixture of experts' fused experts
        with pytest.raises(ValueError, match="adapts parameters, not linear layers") as refused:
            served.read("a", paths["a"])
        assert "\n" not in str(refused.value)
        targets = _linears(model)  # the same model's linear layers alone, served side by side
        paths = {name: save_family_adapter(family, tokenizer, tmp_path / f"{name}-linear", seed, targets)
                 for seed, name in enumerate("ab", 1)}
    for name, path in paths.items():
        served.attach(served.read(name, path))
    torch.manual_seed(0)
    ids = torch.randint(1, len(tokenizer), (4, 7))
    names = ["a", BASE, "b", "a"]
    handles = [served.handle(n) if n != BASE else BASE for n in names]
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        expected = {n: _alone(family, tokenizer, p, ids) for n, p in paths.items()}
        if not served.mixable:  # the set found it cannot tell rows apart: it must say why, and never mix
            assert served.why_not_mixable
            return
        with routing(model, handles):
            prefill = model(input_ids=ids).logits  # many tokens a row
            step = model(input_ids=ids[:, :1]).logits  # a decoding step's shape: one token a row
    for row, name in enumerate(names):
        want = plain[row] if name == BASE else expected[name][row]
        torch.testing.assert_close(prefill[row], want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(step[row], want[:1], rtol=1e-4, atol=1e-4)
