"""The tokenizer as GGUF metadata, so llama.cpp tokenises exactly as the transformers tokenizer that
loraqa trained with: its tokens, merges, special ids, whether it adds BOS, and the pre-tokenizer.

llama.cpp names its pre-tokenizers (how text is split before BPE) and tells them apart by a hash of
the ids a tokenizer gives one test string (``chktxt``); ``pre_tokenizers.json`` is its table. The
hash depends on the vocabulary, so a tokenizer trained anew never matches: one whose pre-tokenizer
is byte-level BPE's own split and nothing else is GPT-2's (llama.cpp's ``gpt-2``, the same regex).
Anything else is refused rather than exported with a guess: a wrong pre-tokenizer tokenises
digits, spaces or unicode differently and the model answers gibberish.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import gguf

TABLE = Path(__file__).with_name("pre_tokenizers.json")


@lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(TABLE.read_text(encoding="utf-8"))


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for how ``tokenizer`` splits text (e.g. ``gpt-2``, ``smollm``, ``llama-bpe``)."""
    table = _table()
    digest = hashlib.sha256(str(tokenizer.encode(table["chktxt"])).encode()).hexdigest()
    if digest in table["hashes"]:
        return table["hashes"][digest]
    spec = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True) and not spec.get("add_prefix_space"):
        return "gpt-2"
    raise ValueError(f"this tokenizer's pre-tokenizer is not one llama.cpp knows (hash {digest[:12]}...): "
                     "it cannot be exported so that llama.cpp tokenises as transformers does")


def _bpe(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    if spec.get("model", {}).get("type") != "BPE":
        kind = spec.get("model", {}).get("type", type(tokenizer).__name__)
        raise ValueError(f"export supports byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3); this one is {kind}")
    return spec["model"]


def _adds(tokenizer, token_id: int | None, first: bool) -> bool:
    """Whether encoding a plain text adds ``token_id`` at its start (``first``) or end."""
    if token_id is None:
        return False
    ids = tokenizer("x")["input_ids"]
    return bool(ids) and ids[0 if first else -1] == token_id


def add_vocab(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """Write ``tokenizer`` into ``writer``: llama.cpp's "gpt2" (byte-level BPE) tokenizer model."""
    model = _bpe(tokenizer)
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):  # the embedding may have more rows than the tokenizer has tokens
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(token_id)
    # as transformers behaves, not as a config says: a BOS added twice, or never, changes every answer
    writer.add_add_bos_token(_adds(tokenizer, tokenizer.bos_token_id, first=True))
    writer.add_add_eos_token(_adds(tokenizer, tokenizer.eos_token_id, first=False))
