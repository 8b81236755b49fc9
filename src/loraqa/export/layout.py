"""Each supported architecture's hyperparameters and weights as llama.cpp expects them.

What differs from the transformers checkpoint, per architecture (as llama.cpp's own
``convert_hf_to_gguf.py`` writes them):
- llama (Llama, SmolLM2, ...): the rows of ``q_proj`` and ``k_proj`` are permuted, as llama.cpp's
  rotary embedding pairs dimensions (i, i + d/2) where transformers' checkpoints interleave; a head
  tied to the embeddings is left out (llama.cpp then uses ``token_embd`` as the output).
- gpt2: the ``Conv1D`` weights are stored (in, out) and written transposed, (out, in); the output
  head is written as a copy of the token embeddings.
Tensor names come from the ``gguf`` package's own map of transformers' names.
"""

from __future__ import annotations

from collections.abc import Iterator

import gguf
import torch

ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "gpt2": gguf.MODEL_ARCH.GPT2}
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def architecture(config) -> str:
    """llama.cpp's architecture name for a transformers config, or a one-line refusal."""
    if config.model_type not in ARCHITECTURES:
        raise ValueError(f"export writes GGUF for the architectures {', '.join(sorted(ARCHITECTURES))}; "
                         f"this model is '{config.model_type}'")
    return config.model_type


def add_hparams(writer: gguf.GGUFWriter, config) -> None:
    """The hyperparameters llama.cpp reads for ``config``'s architecture."""
    heads = config.num_attention_heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(heads)
    if config.model_type == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_feed_forward_length(config.n_inner or 4 * config.hidden_size)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    writer.add_context_length(config.max_position_embeddings)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim != config.hidden_size // heads:  # llama.cpp assumes hidden / heads unless told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if rope.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"export does not write rope scaling '{rope['rope_type']}' yet; this model uses it")


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' q/k rows -> llama.cpp's order (``convert_hf_to_gguf``'s ``permute``)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_name(names: gguf.TensorNameMap, name: str) -> str:
    found = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise ValueError(f"export: no GGUF name for the tensor {name}")
    return found


def base_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor in llama.cpp's layout) for every weight of a plain transformers model."""
    config = model.config
    arch = architecture(config)
    names = gguf.get_tensor_name_map(ARCHITECTURES[arch], config.num_hidden_layers)
    state = model.state_dict()
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    for name, tensor in state.items():
        if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias") or "rotary_emb" in name:
            continue  # buffers transformers rebuilds (GPT-2's causal mask), not weights
        if name == "lm_head.weight" and (tied or (arch == "gpt2")):
            continue  # llama: token_embd serves; gpt2: written from the embeddings below
        yield gguf_name(names, name), layout(config, name, tensor)
        if arch == "gpt2" and name.endswith("wte.weight"):
            yield "output.weight", tensor  # what llama.cpp's converter writes for GPT-2
    if not tied and arch == "llama" and "lm_head.weight" not in state:
        raise ValueError("export: the model has an untied output head that its state dict does not hold")


def permute_qk(config, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Rows of a Llama ``q_proj``/``k_proj`` weight or bias (or of a LoRA B matrix on one, whose rows
    are the weight's) in llama.cpp's order; any other tensor as it is."""
    if config.model_type == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
        return permute_rows(tensor, config.num_attention_heads)
    if config.model_type == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
        return permute_rows(tensor, config.num_key_value_heads or config.num_attention_heads)
    return tensor


def layout(config, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A transformers weight in llama.cpp's layout: GPT-2's Conv1D transposed, Llama's q/k permuted."""
    if config.model_type == "gpt2" and name.endswith(CONV1D):
        return tensor.T
    return permute_qk(config, name, tensor)
