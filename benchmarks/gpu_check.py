"""What loraqa does on a GPU, checked in one run (no GPU in CI: docs/families.md says what this found).

1. Every family of tests/families.py on the device, fp32: ``predict`` (its path checked there,
   batches with rows leaving and carried) against transformers' ``generate`` one question at a time
   on the same device; and the same answers under bf16 autocast run to the end (not compared).
2. The factory-device watch of tests/test_devices.py with the device itself: decoding (rows
   leaving and carried, both paths) and training (plain and passage batches) name it everywhere.
3. A short training run on the device: the loss falls; ``--precision auto``'s choice.
3b. Several LoRA adapters in one batch on the device (``model.adapters``): each question's answer
   its adapter's alone, and the factory watch clean.
4. Answering speed, GPT-2 small's shapes with random weights (so answers run to ``--new-tokens``):
   the bundled 302 questions, fp32 and bf16, questions/s.

    python benchmarks/gpu_check.py --out report.json [--device cuda] [--gpt2-tokenizer DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from conftest import SQUAD, build_tokenizer  # noqa: E402
from families import FAMILIES, MAX_LENGTH  # noqa: E402
from test_devices import FactoryDevices, _leaving_and_carried  # noqa: E402

from loraqa.config import DEFAULT_TEMPLATE, Config  # noqa: E402
from loraqa.data.features import build_eval_features, build_train_features  # noqa: E402
from loraqa.data.load import sample_file  # noqa: E402
from loraqa.data.squad import load_squad_file  # noqa: E402
from loraqa.inference.decoder import decode  # noqa: E402
from loraqa.inference.generate import answer_text, predict, stop_token_ids  # noqa: E402
from loraqa.inference.paths import support_for  # noqa: E402
from loraqa.inference.settings import DecodeSettings  # noqa: E402
from loraqa.model.lora import add_lora  # noqa: E402
from loraqa.model.precision import resolve_precision, store_frozen_weights  # noqa: E402
from loraqa.model.support import DecodingSupport  # noqa: E402
from loraqa.training.loop import train  # noqa: E402

NEW = 10


def families(device: torch.device, tokenizer, examples) -> list[dict]:
    features, _ = build_eval_features(tokenizer, examples, DEFAULT_TEMPLATE, MAX_LENGTH, NEW)
    stops = stop_token_ids(tokenizer)
    rows = []
    for family in FAMILIES:
        model = family.build(tokenizer).to(device)
        start = time.perf_counter()
        ours = predict(model, tokenizer, features, DecodeSettings(MAX_LENGTH, batch_size=6, max_new_tokens=NEW),
                       device, progress=False)
        seconds = time.perf_counter() - start
        same = 0
        with torch.inference_mode():
            for f in features:
                ids = torch.tensor([f.input_ids], device=device)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                                     eos_token_id=stops, pad_token_id=tokenizer.eos_token_id)
                same += answer_text(tokenizer, out[0, ids.shape[1]:].tolist()) == ours[f.id]
        bf16 = predict(model, tokenizer, features, DecodeSettings(MAX_LENGTH, batch_size=6, max_new_tokens=NEW),
                       device, "bf16", progress=False)
        support = support_for(model)
        rows.append({"family": family.id, "same": same, "questions": len(features), "path": support.path,
                     "expected_path": family.path, "why": support.why, "fp32_seconds": round(seconds, 3),
                     "bf16_answered": len(bf16)})
        print(f"{family.id:22s} {same}/{len(features)} path={support.path} ({support.why})", flush=True)
    return rows


def devices(device: torch.device, tokenizer, examples) -> dict:
    from conftest import build_tiny_model

    wrong = {}
    for arch in ("gpt2", "llama"):
        model = build_tiny_model(arch)[0].to(device).eval()
        batches, stops = _leaving_and_carried(model.cpu(), tokenizer, examples)
        model.to(device)
        batches = [type(b)(b.input_ids.to(device), b.attention_mask.to(device), b.tags,
                           tuple(t.to(device) for t in b.prefix)) for b in batches]
        for path in ("shared", "copies"):
            watch = FactoryDevices(device)
            with watch, torch.inference_mode():
                list(decode(model, batches, 8, stops.to(device), support=DecodingSupport(path, "check")))
            wrong[f"decode {arch} {path}"] = watch.wrong
        features, _ = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, 512)
        for by_passage in (False, True):
            lora = add_lora(build_tiny_model(arch)[0]).to(device)
            watch = FactoryDevices(device)
            with watch:
                train(lora, features, features[:3], Config(epochs=1, batch_size=4, group_by_passage=by_passage),
                      pad_id=tokenizer.pad_token_id, device=device, precision="fp32", progress=False)
            wrong[f"train {arch} passage={by_passage}"] = watch.wrong
    for k, v in wrong.items():
        print(f"{k:32s} {'clean' if not v else v[:6]}", flush=True)
    return wrong


def training(device: torch.device, tokenizer, examples) -> dict:
    from conftest import build_tiny_model

    features, _ = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, 512)
    torch.manual_seed(0)
    model = add_lora(build_tiny_model("llama")[0], lora_dropout=0.0).to(device)
    precision, why = resolve_precision("auto", device)
    history, _ = train(model, features, features, Config(epochs=6, batch_size=2, lr=3e-2, warmup_ratio=0.0),
                       pad_id=tokenizer.pad_token_id, device=device, precision=precision, progress=False)
    result = {"precision": precision, "why": why, "eval_loss": [round(r["eval_loss"], 4) for r in history]}
    print(f"training on {device}: {result}", flush=True)
    return result


def adapters(device: torch.device, tokenizer, examples, folder) -> dict:
    from conftest import build_tiny_model

    from loraqa.model.adapters import AdapterSet
    from loraqa.model.multilora import BASE

    for seed, name in enumerate("ab", 1):
        torch.manual_seed(seed)
        peft = add_lora(build_tiny_model("llama")[0], lora_dropout=0.0)
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.5)
        peft.save_pretrained(f"{folder}/{name}")
    model = build_tiny_model("llama")[0].to(device).eval()
    served = AdapterSet(model, Config(model="tiny"), "tiny")
    handles = {name: served.attach(served.read(name, f"{folder}/{name}")) for name in "ab"}
    handles[BASE] = BASE
    features, _ = build_eval_features(tokenizer, examples, DEFAULT_TEMPLATE, 512, 8)
    settings = DecodeSettings(512, batch_size=4, max_new_tokens=8)
    mixed_names = {f.id: [handles["a"], handles["b"], BASE][i % 3] for i, f in enumerate(features)}
    watch = FactoryDevices(device)
    with watch:
        mixed = predict(model, tokenizer, features, settings, device, progress=False, adapters=mixed_names)
    same = 0
    for name in handles.values():
        alone = predict(model, tokenizer, features, settings, device, progress=False,
                        adapters={f.id: name for f in features})
        same += sum(mixed[f.id] == alone[f.id] for f in features if mixed_names[f.id] == name)
    result = {"same": same, "questions": len(features), "watch": watch.wrong}
    print(f"mixed adapters on {device}: {result}", flush=True)
    return result


def speed(device: torch.device, gpt2_tokenizer: str | None) -> dict:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer) if gpt2_tokenizer else build_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    examples = load_squad_file(sample_file("eval"))
    features, _ = build_eval_features(tokenizer, examples, DEFAULT_TEMPLATE, 1024, 32)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).to(device).eval()  # GPT-2 small's shapes
    out = {"questions": len(features), "tokenizer": "gpt2" if gpt2_tokenizer else "tests' byte-level BPE"}
    for precision in ("fp32", "bf16"):
        restore = store_frozen_weights(model, precision, everything=True)  # as answering stores them
        settings = DecodeSettings(1024, batch_size=64, max_new_tokens=32)
        predict(model, tokenizer, features[:64], settings, device, precision, progress=False)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        predict(model, tokenizer, features, settings, device, precision, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[f"{precision}_questions_per_second"] = round(len(features) / (time.perf_counter() - start), 1)
        restore()
    print(f"speed: {out}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--gpt2-tokenizer", help="a folder with GPT-2's tokenizer files, for the speed part")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    import transformers

    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__}
    print(report, flush=True)
    tokenizer = build_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    report["devices"] = devices(device, tokenizer, load_squad_file(SQUAD))
    report["training"] = training(device, tokenizer, load_squad_file(SQUAD))
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        report["adapters"] = adapters(device, tokenizer, load_squad_file(SQUAD), folder)
    sample = load_squad_file(sample_file("eval"))
    passages = list(dict.fromkeys(ex.context for ex in sample))[:3]
    report["families"] = families(device, tokenizer, [ex for ex in sample if ex.context in passages][:15])
    if not args.skip_speed:
        report["speed"] = speed(device, args.gpt2_tokenizer)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
