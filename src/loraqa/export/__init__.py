"""Export: a model leaving loraqa as one GGUF file (llama.cpp, Ollama, LM Studio)."""
