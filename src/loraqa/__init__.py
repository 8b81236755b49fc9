"""loraqa: LoRA fine-tuning of causal language models for extractive question answering."""

__version__ = "0.1.0"

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and Hugging Face models) skip
