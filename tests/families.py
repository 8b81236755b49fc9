"""The model families the tests walk (tests/test_families.py): tiny random configs (2 layers, 64
wide, grouped-query heads, fp32, the tests' byte-level tokenizer), each with the features of attention
or the cache it exercises and the answering path loraqa must choose for it (``model.support``).
docs/families.md holds the same table for readers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_LENGTH = 1024  # the tests' prompt + answer budget: every window below is compared with it
BASE = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "intermediate_size": 128, "max_position_embeddings": 1024}
SHORT = 48    # a sliding window shorter than every prompt
MIXED = 581   # one some prompts fit and others do not (two passages' prompts fit, the third's in part)
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}


@dataclass(frozen=True)
class Family:
    id: str
    model_type: str
    settings: dict
    exercises: str
    path: str = "shared"                  # the path model.support picks
    window: int | None = None             # the smallest sliding window (questions longer go to generate)
    layer_types: list[str] | None = field(default=None)
    rope_limit: int | None = None         # where its rope scaling changes with the sequence (longer go to generate)
    # Gemma-2/3 multiply embeddings by sqrt(width) and norm each block's output: at the tests' init the
    # last token's embedding drowns the passage and every prompt gets one answer; smaller, it does not
    embedding_scale: float = 1.0

    @property
    def longest(self) -> int | None:
        """The longest question (prompt + answer) the fast paths take."""
        return min((n for n in (self.window, self.rope_limit) if n is not None), default=None)

    def config(self, vocab_size: int, eos_id: int):
        from transformers import AutoConfig

        extra = {"layer_types": self.layer_types} if self.layer_types else {}
        return AutoConfig.for_model(self.model_type, vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id,
                                    pad_token_id=eos_id, initializer_range=0.3, **self.settings, **extra)

    def build(self, tokenizer):
        """The seeded random model, in eval mode, float32."""
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        config = self.config(len(tokenizer), tokenizer.eos_token_id)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(self.embedding_scale)
        return model


SLIDING_FULL = ["sliding_attention", "full_attention"]

FAMILIES = [
    Family("gpt2", "gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 1024},
           "learned positions, fused q/k/v in a Conv1D (c_attn), tied head"),
    Family("llama", "llama", BASE, "grouped-query heads, rotary positions, untied head"),
    Family("llama-mqa-tied", "llama", {**BASE, "num_key_value_heads": 1, "tie_word_embeddings": True},
           "one key/value head for all query heads, tied head"),
    Family("mistral", "mistral", {**BASE, "sliding_window": 4096},
           "sliding window on every layer, longer than any prompt", window=4096),
    Family("mistral-short-window", "mistral", {**BASE, "sliding_window": SHORT},
           "sliding window shorter than every prompt: transformers' generate answers", window=SHORT),
    Family("mixtral", "mixtral", {**BASE, "num_local_experts": 4, "num_experts_per_tok": 2},
           "mixture of experts"),
    Family("qwen2", "qwen2", BASE, "q/k/v biases (the defaults: no window)"),
    Family("qwen2-sliding", "qwen2", {**BASE, "use_sliding_window": True, "sliding_window": MIXED,
                                      "max_window_layers": 1},
           "full and sliding layers, a window some prompts exceed (those go to generate)", window=MIXED),
    Family("qwen2-moe", "qwen2_moe", {**BASE, **MOE, "num_experts": 4, "shared_expert_intermediate_size": 64},
           "mixture of experts with a shared expert, q/k/v biases"),
    Family("qwen3", "qwen3", {**BASE, "head_dim": 32}, "q/k norms, a head width of its own (not hidden/heads)"),
    Family("qwen3-moe", "qwen3_moe", {**BASE, **MOE, "num_experts": 4, "head_dim": 16}, "mixture of experts, q/k norms"),
    Family("phi3", "phi3", {**BASE, "sliding_window": 2047}, "fused q/k/v (qkv_proj), a window longer than any prompt",
           window=2047),
    Family("gemma", "gemma", {**BASE, "head_dim": 16}, "scaled embeddings, tied head, GELU"),
    Family("gemma2", "gemma2", {**BASE, "head_dim": 16, "sliding_window": 4096}, "soft-capped attention and "
           "logits (eager attention: the model's own function), alternating sliding layers", path="copies",
           window=4096, layer_types=SLIDING_FULL, embedding_scale=0.03),
    Family("gemma2-short-window", "gemma2", {**BASE, "head_dim": 16, "sliding_window": SHORT},
           "soft-capping with a window shorter than every prompt", path="copies", window=SHORT,
           layer_types=SLIDING_FULL, embedding_scale=0.03),
    Family("gemma3-text", "gemma3_text", {**BASE, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": MIXED},
           "q/k norms, local and global rotary bases, a window some prompts exceed", window=MIXED,
           layer_types=SLIDING_FULL, embedding_scale=0.03),
    Family("olmo2", "olmo2", BASE, "norms after attention and MLP, q/k norms"),
    Family("gpt-neox", "gpt_neox", {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                                    "intermediate_size": 128, "max_position_embeddings": 1024},
           "partial rotary, parallel residual, fused q/k/v with biases"),
    Family("opt", "opt", {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "ffn_dim": 128,
                          "max_position_embeddings": 1024, "word_embed_proj_dim": 64},
           "learned positions (offset by 2), biases everywhere"),
    Family("granite", "granite", {**BASE, "logits_scaling": 4.0, "embedding_multiplier": 2.0,
                                  "residual_multiplier": 0.5, "attention_multiplier": 0.1},
           "scaled logits, embeddings, residuals and attention"),
    Family("smollm3", "smollm3", {**BASE, "no_rope_layers": [1, 0]}, "a layer without rotary positions"),
    Family("biogpt", "biogpt", {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                                "intermediate_size": 128, "max_position_embeddings": 1024},
           "attention that takes no registered function", path="copies"),
    Family("gpt-neo", "gpt_neo", {"hidden_size": 64, "num_heads": 4, "num_layers": 2, "intermediate_size": 128,
                                  "max_position_embeddings": 1024, "attention_types": [[["global", "local"], 1]],
                                  "window_size": MIXED},
           "local layers masked by a buffer made at load from window_size (read by cache slot), a window some "
           "prompts exceed; attention that takes no registered function", path="copies", window=MIXED),
    Family("phi3-longrope", "phi3", {**BASE, "max_position_embeddings": 4096, "original_max_position_embeddings": MIXED,
                                     "sliding_window": None,
                                     "rope_parameters": {"rope_type": "longrope", "factor": 4096 / MIXED,
                                                         "short_factor": [1.0 + i / 8 for i in range(8)],
                                                         "long_factor": [1.0 + i for i in range(8)]}},
           "LongRoPE (Phi-3-128k): every row takes the long factors once one passes original_max_position_embeddings, "
           "which some prompts do (those go to generate)", rope_limit=MIXED),
    Family("llama-dynamic-rope", "llama", {**BASE, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
           "dynamic NTK rope: the frequencies change past max_position_embeddings, which --max-length never passes",
           rope_limit=BASE["max_position_embeddings"]),
    Family("bloom", "bloom", {"hidden_size": 64, "n_head": 4, "n_layer": 2},
           "ALiBi from the attention mask, no position ids: transformers' generate answers", path="generate"),
]
