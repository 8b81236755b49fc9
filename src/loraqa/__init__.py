"""loraqa: LoRA fine-tuning of causal language models for extractive question answering."""

import time

__version__ = "0.1.0"
STARTED = time.perf_counter()  # when loraqa was first imported: what a command's start cost is counted from

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and Hugging Face models) skip
