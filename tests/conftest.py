"""Shared fixtures: a tiny GPT-2 and a byte-level BPE tokenizer, both built here, offline."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
SQUAD = FIXTURES / "tiny-squad.json"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _corpus() -> list[str]:
    data = json.loads(SQUAD.read_text())
    texts = ["Context: Question: Answer:\n"]
    for article in data["data"]:
        for p in article["paragraphs"]:
            texts.append(p["context"])
            for qa in p["qas"]:
                texts += [qa["question"]] + [" " + a["text"] for a in qa["answers"]]
    return texts * 4


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    # like GPT-2: EOS only, no pad token (loraqa must set pad = eos itself)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def build_tiny_model(arch: str, n_positions: int = 512):
    """(a 2-layer random ``arch`` model, seeded, and the test tokenizer): GPT-2 32 wide, or a Llama with
    grouped-query attention, rotary positions and a tied head."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    special = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "initializer_range": 0.3}  # logits wide enough for LoRA to move them
    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=32, n_layer=2,
                                          n_head=2, **special)), tokenizer
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_attention_heads=4,
                                        num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128,
                                        max_position_embeddings=n_positions, tie_word_embeddings=True,
                                        **special)), tokenizer


def save_tiny_model(folder: Path, arch: str, n_positions: int = 512):
    """``build_tiny_model`` saved to ``folder`` (weights and tokenizer); returns (model in eval mode, tokenizer)."""
    model, tokenizer = build_tiny_model(arch, n_positions)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval(), tokenizer


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    """Each test its own loraqa cache folder: none reads or fills the user's, and none takes another
    test's recorded path check (tests that patch a path to fail would otherwise find it recorded)."""
    folder = tmp_path / "loraqa-cache"
    monkeypatch.setenv("LORAQA_CACHE", str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder with a 2-layer, 32-wide GPT-2 (seeded random weights) and its tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    save_tiny_model(folder, "gpt2")
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (grouped-query attention, rotary positions, a tied head) with the same tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(folder, "llama")
    return folder


@pytest.fixture()
def tokenizer(tiny_model_dir):
    from loraqa.model.load import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture()
def tiny_model(tiny_model_dir):
    from loraqa.model.load import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture()
def examples():
    from loraqa.data.squad import load_squad_file

    return load_squad_file(SQUAD)


needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"needs the shared data folder at {SHARED}")


def make_adapter(tiny_model_dir, folder, seed: int = 0):
    """A saved LoRA adapter (the model's default targets) on the tiny model in ``tiny_model_dir``
    whose B matrices are not zero (so it changes the outputs), seeded."""
    from loraqa.model.load import load_model
    from loraqa.model.lora import add_lora

    base = load_model(str(tiny_model_dir))  # seeds torch itself (its seed, 0): ``seed`` is set after it
    torch.manual_seed(seed)
    model = add_lora(base, lora_dropout=0.0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(folder)
    return folder


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server or a rendezvous a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app):
    """(base url, stop) for ``app`` served on a free loopback port in a thread."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)

    def stop():
        server.should_exit = True
        thread.join(10)
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def request(url: str, body: bytes | dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def save_family_adapter(family, tokenizer, folder, seed: int, targets="all-linear") -> str:
    """An ``all-linear`` LoRA of ``family`` with non-zero B (seeded), saved to ``folder``."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    model = family.build(tokenizer)
    torch.manual_seed(seed)
    conv = any(isinstance(m, Conv1D) for m in model.modules())
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8.0, target_modules=targets, lora_dropout=0.0,
                                            fan_in_fan_out=conv))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    peft.save_pretrained(folder)
    return str(folder)


def pdf_bytes(pages: list[str]) -> bytes:
    """A minimal PDF whose pages hold ``pages``' text in Helvetica (one line each)."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream.decode()}\nendstream")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objects)} 0 R "
                       "/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


# a document longer than a small window, the answer to "When was the mill rebuilt?" in its last sentence
LONG_DOCUMENT = " ".join(f"Paragraph {n} tells of the river, the hills and the old roads of the valley."
                         for n in range(60)) + "\n\nThe mill was rebuilt in 1887 by the Muller family."
LONG_DOCUMENT_QUESTIONS = ["When was the mill rebuilt?", "Who rebuilt the mill?", "What tells of the river?",
                           "Which roads are old?", "What is in the valley?", "Where are the hills?"]
