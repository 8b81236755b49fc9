"""Several adapters over one base (model/adapters.py): each row of a mixed batch computes what PEFT
computes for its own adapter alone, for a decoding step and a prefill, on GPT-2's Conv1D and a
Llama, with per-layer ranks and alphas; what cannot share the base is refused in one line."""

import json

import pytest
import torch
from conftest import build_tiny_model

from loraqa.config import Config
from loraqa.model.adapters import AdapterSet, read_adapter_flags
from loraqa.model.multilora import BASE, routing


def _save(model_dir_model, folder, seed: int, **lora):
    """A LoRA adapter (non-zero B, seeded) of ``model`` saved to ``folder``."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    base, _ = model_dir_model
    torch.manual_seed(seed)
    conv = any(isinstance(m, Conv1D) for m in base.modules())
    settings = {"r": 4, "lora_alpha": 8.0, "target_modules": "all-linear", "lora_dropout": 0.0, **lora}
    peft = get_peft_model(base, LoraConfig(fan_in_fan_out=conv, **settings))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    peft.save_pretrained(folder)
    peft.unload()
    return str(folder)


def _peft_logits(arch, path, ids):
    from peft import PeftModel

    model, _ = build_tiny_model(arch)
    with torch.no_grad():
        return PeftModel.from_pretrained(model, path).eval()(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_each_row_of_a_mixed_batch_is_its_adapter_alone(arch, tmp_path):
    adapters = {"a": _save(build_tiny_model(arch), tmp_path / "a", 1),
                "b": _save(build_tiny_model(arch), tmp_path / "b", 2, use_rslora=True),
                "c": _save(build_tiny_model(arch), tmp_path / "c", 3, rank_pattern={"c_attn": 2, "q_proj": 2},
                           alpha_pattern={"c_proj": 3.0, "v_proj": 3.0})}
    model, _ = build_tiny_model(arch)
    model.eval()
    served = AdapterSet(model, Config(model="tiny"), "tiny")
    for name, path in adapters.items():
        served.attach(served.read(name, path))
    ids = torch.randint(1, 300, (4, 9))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        for names in (["a", "b", "c", BASE], ["b", "b", "b", "b"], ["c", BASE, "c", BASE]):  # stack, slice, gathers
            with routing(model, [served.handle(n) if n != BASE else n for n in names]):
                mixed = model(input_ids=ids).logits  # a prefill: 9 tokens a row
                step = model(input_ids=ids[:, :1]).logits  # a decoding step's shape: one token a row
            for row, name in enumerate(names):
                expected = plain[row] if name == BASE else _peft_logits(arch, adapters[name], ids[row:row + 1])[0]
                torch.testing.assert_close(mixed[row], expected, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(step[row], expected[:1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(input_ids=ids).logits, plain)  # outside routing: the base alone


def test_a_detached_adapter_leaves_the_others_as_they_were(tmp_path):
    paths = {n: _save(build_tiny_model("llama"), tmp_path / n, seed) for seed, n in enumerate("ab", 1)}
    model, _ = build_tiny_model("llama")
    served = AdapterSet(model.eval(), Config(model="tiny"), "tiny")
    for name, path in paths.items():
        served.attach(served.read(name, path))
    ids = torch.randint(1, 300, (2, 5))
    with torch.no_grad(), routing(model, [served.handle("b"), BASE]):
        before = model(input_ids=ids).logits
    served.detach(served.retire("a"))
    assert served.names == ["b"]
    with torch.no_grad(), routing(model, [served.handle("b"), BASE]):
        torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_what_cannot_share_the_base_is_refused_in_one_line(tmp_path):
    llama, _ = build_tiny_model("llama")
    served = AdapterSet(llama.eval(), Config(model="tiny"), "tiny")
    gpt2 = _save(build_tiny_model("gpt2"), tmp_path / "gpt2", 1)
    dora = _save(build_tiny_model("llama"), tmp_path / "dora", 1, use_dora=True)
    good = _save(build_tiny_model("llama"), tmp_path / "good", 1)
    cases = [("g", gpt2, "is not in the base model: made for another one"),
             ("d", dora, "DoRA, or modules in full"),
             ("x", str(tmp_path), "no adapter_config.json there"),
             (BASE, good, "not a usable name"),
             ("tiny", good, "not a usable name")]
    for name, path, reason in cases:
        with pytest.raises(ValueError, match=reason) as e:
            served.read(name, path)
        assert "\n" not in str(e.value)
    served.attach(served.read("good", good))
    with pytest.raises(ValueError, match="loaded already"):
        served.read("good", good)
    (tmp_path / "other").mkdir()
    other = _save(build_tiny_model("llama"), tmp_path / "other", 2)
    (tmp_path / "other" / "loraqa.json").write_text(json.dumps({"template": "Q: {question} C: {context} A:"}))
    with pytest.raises(ValueError, match="other prompt settings than this server answers with \\(template "):
        served.read("other", other)


def test_adapter_flags_one_plain_path_or_names():
    assert read_adapter_flags(["runs/x/adapter"]) == [(None, "runs/x/adapter")]
    assert read_adapter_flags(["a=runs/a", "b=/abs/b"]) == [("a", "runs/a"), ("b", "/abs/b")]
    with pytest.raises(ValueError, match="need names"):
        read_adapter_flags(["a=runs/a", "runs/b"])
    with pytest.raises(ValueError, match="given twice"):
        read_adapter_flags(["a=x", "a=y"])


def test_a_model_whose_layer_sees_a_subset_of_tokens_is_never_mixed(tmp_path):
    """A layer given some of the tokens (a mixture of experts' routed expert) cannot be told which row
    each is: the set finds it when the adapter is attached, says why, and a mixed forward refuses."""
    from torch import nn

    from loraqa.model.adapters import ReadAdapter
    from loraqa.model.multilora import UnroutableMix

    class Subset(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.proj = nn.Embedding(10, 8), nn.Linear(8, 8)

        def forward(self, input_ids, use_cache=False):
            return self.proj(self.embed(input_ids).reshape(-1, 8)[::2])  # every other token

    model = Subset().eval()
    served = AdapterSet(model, Config(model="tiny"), "tiny")
    handle = served.attach(ReadAdapter("a", str(tmp_path), {"proj": (torch.ones(2, 8), torch.ones(8, 2), 1.0)}))
    assert not served.mixable and "tokens for 2 rows" in served.why_not_mixable
    with torch.no_grad(), routing(model, [handle, BASE]), pytest.raises(UnroutableMix):
        model(torch.ones(2, 3, dtype=torch.long))
    with torch.no_grad(), routing(model, [handle, handle]):  # one adapter for every row: no routing needed
        model(torch.ones(2, 3, dtype=torch.long))
