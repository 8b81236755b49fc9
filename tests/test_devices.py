"""Tensors are made where the tensors they meet live: no GPU here, so every tensor factory called
by loraqa's compute stages (decoding, training, what the server runs) must name the model's device.
A factory with no device makes a CPU tensor, which on a GPU meets CUDA tensors and fails (or copies)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from loraqa.config import DEFAULT_TEMPLATE, Config
from loraqa.data.batching import collate_shared_prefix, split_groups
from loraqa.data.features import build_eval_features, build_train_features
from loraqa.inference.decoder import Batch, decode
from loraqa.inference.generate import predict
from loraqa.inference.settings import DecodeSettings
from loraqa.model.lora import add_lora
from loraqa.model.support import DecodingSupport
from loraqa.training.loop import train

PACKAGE = Path(__import__("loraqa").__file__).parent
WATCHED = tuple(str(PACKAGE / stage) for stage in ("model", "inference", "training"))  # data/ collates on the host
FACTORIES = {torch.tensor, torch.as_tensor, torch.arange, torch.zeros, torch.ones, torch.full, torch.empty,
             torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye}
# torch's own dispatch between a call and this mode (a factory torch itself calls, AdamW's step
# counters say, is torch's business, not loraqa's)
DISPATCH = tuple(str(Path(torch.__file__).parent / f) for f in ("overrides.py", "utils/_device.py"))


def _same(named, device: torch.device) -> bool:
    """Whether a factory's ``device=`` names ``device`` ("cuda" and "cuda:0" alike for the current GPU)."""
    if named is None:
        return False
    named = torch.device(named)
    return named.type == device.type and (named.index is None or device.index is None or named.index == device.index)


class FactoryDevices(TorchFunctionMode):
    """Records each factory call from loraqa's compute stages that names no device or another one than ``device``."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.wrong = device, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES:
            frame = sys._getframe(1)
            while frame and frame.f_code.co_filename.startswith(DISPATCH):
                frame = frame.f_back
            where = frame.f_code.co_filename if frame else ""
            named = kwargs.get("device")
            if where.startswith(WATCHED) and not _same(named, self.device):
                self.wrong.append(f"{Path(where).relative_to(PACKAGE)}:{frame.f_lineno} {func.__name__}(device={named})")
        return func(*args, **kwargs)


def _leaving_and_carried(model, tokenizer, examples):
    """Two batches whose rows end at different steps (stop tokens picked from a first run), so
    rows leave the cache and the last ones are carried into the next batch; and that run's tokens."""
    features, _ = build_eval_features(tokenizer, examples, DEFAULT_TEMPLATE, 512, 8)
    t = collate_shared_prefix(split_groups(features), tokenizer.pad_token_id)
    n = len(features)

    def batches(offset):
        return Batch(t["input_ids"], t["attention_mask"], list(range(offset, offset + n)),
                     (t["prefix_ids"], t["prefix_mask"], t["row_prefix"]))

    with torch.inference_mode():
        full = {tag: tok for tag, tok, _ in decode(model, [batches(0)], 8, torch.tensor([-1]))}
    stops = torch.tensor(sorted({full[r][1] for r in range(n)} - set(full[0])))  # row 0 runs on, others stop
    return [batches(0), batches(n)], stops, full


@pytest.mark.parametrize("guessing", [False, True])
@pytest.mark.parametrize("path", ["shared", "copies"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoding_makes_its_tensors_on_the_models_device(arch, path, guessing, tiny_model_dir, tiny_llama_dir,
                                                         tokenizer, examples):
    """Rows leaving and carried; with ``guessing``, steps that check guessed tokens (inference.drafting)."""
    from loraqa.model.load import load_model
    from tests.inference.test_lookup import Guess

    model = load_model(str(tiny_llama_dir if arch == "llama" else tiny_model_dir)).eval()
    batches, stops, full = _leaving_and_carried(model, tokenizer, examples)
    n = len(full)
    guess = Guess({tag: full[tag % n] for tag in range(2 * n)}, 2) if guessing else None
    watch = FactoryDevices(torch.device("cpu"))
    with watch, torch.inference_mode():
        ended = {tag: tok for tag, tok, _ in decode(model, batches, 8, stops, support=DecodingSupport(path, "test"),
                                                    draft=guess)}
    assert not guessing or guess.guessed
    assert len({len(t) for t in ended.values()}) > 1  # rows did leave at different steps
    assert not watch.wrong, watch.wrong


def test_answering_and_its_check_make_their_tensors_on_the_models_device(tiny_model, tokenizer, examples):
    """``predict``: the path's check against ``generate``, batches carried, and the reference path."""
    features, _ = build_eval_features(tokenizer, examples, DEFAULT_TEMPLATE, 512, 6)
    watch = FactoryDevices(torch.device("cpu"))
    with watch:
        predict(tiny_model, tokenizer, features, DecodeSettings(512, batch_size=2, max_new_tokens=6),
                torch.device("cpu"), progress=False)
        tiny_model._loraqa_decoding = DecodingSupport("generate", "test", checked=True)
        predict(tiny_model, tokenizer, features[:2], DecodeSettings(512, max_new_tokens=6), torch.device("cpu"),
                progress=False)
    assert not watch.wrong, watch.wrong


@pytest.mark.parametrize("group_by_passage", [False, True])
def test_training_makes_its_tensors_on_the_models_device(tiny_model, tokenizer, examples, group_by_passage):
    features, _ = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, 512)
    model = add_lora(tiny_model)
    config = Config(epochs=1, batch_size=4, lr=1e-2, warmup_ratio=0.0, group_by_passage=group_by_passage,
                    max_grad_norm=1.0)
    watch = FactoryDevices(torch.device("cpu"))
    with watch:
        train(model, features, features[:3], config, pad_id=tokenizer.pad_token_id, device=torch.device("cpu"),
              precision="fp32", progress=False)
    assert not watch.wrong, watch.wrong


def test_the_watch_catches_a_factory_with_no_device():
    """The check itself: a loraqa-stage call naming no device, or another one, is caught; one naming
    the device ("cpu:0" as "cpu"), and torch's own (an optimizer's step counters), are not."""
    from loraqa.model import prefix

    watch = FactoryDevices(torch.device("cpu"))
    with watch:
        # as if from model/prefix.py
        exec(compile("torch.tensor([1]); torch.zeros(1, device='meta'); torch.ones(1, device='cpu:0')",
                     prefix.__file__, "exec"), {"torch": torch})
        weight = torch.nn.Parameter(torch.ones(2, device="cpu"))
        weight.grad = torch.ones(2, device="cpu")
        torch.optim.AdamW([weight]).step()
    assert [w.split()[1] for w in watch.wrong] == ["tensor(device=None)", "zeros(device=meta)"]


def test_mixed_adapter_decoding_makes_its_tensors_on_the_models_device(tiny_llama_dir, tokenizer, examples, tmp_path):
    """Rows of several LoRA adapters in one batch (model.adapters): the masks and row indices too."""
    from loraqa.model.adapters import AdapterSet
    from loraqa.model.multilora import BASE
    from loraqa.model.load import load_model

    for seed, name in enumerate("ab", 1):
        torch.manual_seed(seed)
        peft = add_lora(load_model(str(tiny_llama_dir)), lora_dropout=0.0)
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.5)
        peft.save_pretrained(tmp_path / name)
    model = load_model(str(tiny_llama_dir)).eval()
    served = AdapterSet(model, Config(model=str(tiny_llama_dir)), "base")
    handles = [served.attach(served.read(name, str(tmp_path / name))) for name in "ab"]
    features, _ = build_eval_features(tokenizer, examples, DEFAULT_TEMPLATE, 512, 6)
    adapters = {f.id: [*handles, BASE][i % 3] for i, f in enumerate(features)}
    watch = FactoryDevices(torch.device("cpu"))
    with watch:
        predict(model, tokenizer, features, DecodeSettings(512, batch_size=4, max_new_tokens=6), torch.device("cpu"),
                progress=False, adapters=adapters)
    assert not watch.wrong, watch.wrong
