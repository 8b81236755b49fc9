"""GGUF files written with the ``gguf`` package (its writer and its Q8_0 quantiser): no llama.cpp build.

``write_model``: a plain transformers model (base + LoRA merged) as one file. ``write_adapter``: the
LoRA alone (``general.type = adapter``), for ``llama-cli -m base.gguf --lora adapter.gguf`` and
Ollama's ``ADAPTER``. Both are written atomically (``io.save_file_atomic``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from loraqa.export.layout import ARCHITECTURES, add_hparams, architecture, base_tensors, gguf_name, permute_qk
from loraqa.export.vocab import add_vocab
from loraqa.io import log, save_file_atomic

OUTTYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def _encode(name: str, tensor: torch.Tensor, outtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A tensor in the file's type: norms, biases and position embeddings stay f32 (as llama.cpp's
    converter keeps them); q8_0 needs rows in blocks of 32 and falls back to f16 otherwise."""
    data = tensor.detach().float().contiguous().numpy()
    if outtype == "f32" or data.ndim < 2 or name.startswith("position_embd"):
        return data, gguf.GGMLQuantizationType.F32
    if outtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def _write(writer: gguf.GGUFWriter, path: Path, progress: bool) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress)
    writer.close()


def _save(path: Path, fill) -> None:
    """``fill(tmp)`` writes the GGUF file, atomically (``io.save_file_atomic``); its size and time logged."""
    start = time.perf_counter()
    save_file_atomic(path, fill)
    log(f"wrote {path} ({path.stat().st_size / 2 ** 20:.1f} MiB) in {time.perf_counter() - start:.1f} s")


def write_model(model, tokenizer, path: str | Path, outtype: str = "f16", name: str = "loraqa",
                progress: bool = True) -> Path:
    """``model`` (a plain transformers causal LM) and ``tokenizer`` as one GGUF file."""
    config = model.config
    arch = architecture(config)
    path = Path(path)
    tensors = list(base_tensors(model))

    def fill(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[ARCHITECTURES[arch]])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        add_hparams(writer, config)
        writer.add_file_type(OUTTYPES[outtype])
        add_vocab(writer, tokenizer, config.vocab_size)
        for gname, tensor in tqdm(tensors, desc=f"encode {outtype}", unit="tensor", disable=not progress):
            data, qtype = _encode(gname, tensor, outtype)
            writer.add_tensor(gname, data, raw_dtype=qtype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _write(writer, tmp, progress)

    _save(path, fill)
    return path


def adapter_tensors(peft_model) -> tuple[list[tuple[str, torch.Tensor]], float]:
    """([(GGUF name + ".lora_a"/".lora_b", tensor)], the adapter's alpha), or a one-line refusal
    where llama.cpp's adapters cannot hold the adapter.

    llama.cpp scales each layer by alpha / that layer's rank, one alpha for the file. PEFT's scale
    can differ by layer (``alpha_pattern``, ``rank_pattern``, rsLoRA's alpha / sqrt(r)): each
    layer's own scale (PEFT's ``scaling``) is folded into its B where it differs from alpha / r, so
    every product llama.cpp computes is the one PEFT does."""
    from peft.tuners.lora import LoraLayer

    name = peft_model.active_adapter
    settings = peft_model.peft_config[name]
    if getattr(settings, "use_dora", False):
        raise ValueError("--adapter-only: a DoRA adapter has magnitudes llama.cpp adapters cannot hold; export it merged")
    if settings.modules_to_save:
        raise ValueError(f"--adapter-only: the adapter trains {', '.join(settings.modules_to_save)} in full, which "
                         "llama.cpp adapters cannot hold; export it merged")
    base = peft_model.get_base_model()
    config = base.config
    arch = architecture(config)
    names = gguf.get_tensor_name_map(ARCHITECTURES[arch], config.num_hidden_layers)
    alpha = float(settings.lora_alpha)
    out = []
    for module_name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or name not in module.lora_A:
            continue
        if name in getattr(module, "lora_embedding_A", {}):
            raise ValueError("--adapter-only: the adapter holds LoRA on embeddings, which is not exported; export it merged")
        a, b = module.lora_A[name].weight, module.lora_B[name].weight  # (r, in), (out, r)
        fold = module.scaling[name] / (alpha / a.shape[0])  # PEFT's scale over llama.cpp's
        if not math.isclose(fold, 1.0, rel_tol=1e-9):
            b = b * fold
        weight = f"{module_name}.weight"
        gname = gguf_name(names, weight)
        out += [(f"{gname}.lora_a", a), (f"{gname}.lora_b", permute_qk(config, weight, b))]  # B's rows are the weight's
    if not out:
        raise ValueError("--adapter-only: the adapter has no LoRA layers")
    return out, alpha


def write_adapter(peft_model, path: str | Path, progress: bool = True) -> Path:
    """The LoRA of ``peft_model`` as a GGUF adapter for the base model's GGUF file."""
    path = Path(path)
    tensors, alpha = adapter_tensors(peft_model)
    arch = architecture(peft_model.get_base_model().config)

    def fill(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[ARCHITECTURES[arch]])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        for gname, tensor in tensors:
            writer.add_tensor(gname, tensor.detach().float().contiguous().numpy())
        _write(writer, tmp, progress)

    _save(path, fill)
    return path
