"""The export job (``loraqa export``): a model, or a model plus a trained adapter, as one GGUF file
that llama.cpp and Ollama run, with an Ollama Modelfile beside it; or the adapter alone
(``--adapter-only``) as a GGUF LoRA adapter for the base model's GGUF file."""

from __future__ import annotations

from pathlib import Path

from loraqa.config import Config
from loraqa.export.layout import architecture
from loraqa.export.modelfile import commands, modelfile
from loraqa.export.writer import write_adapter, write_model
from loraqa.io import log, write_text_atomic
from loraqa.model.load import load_base
from loraqa.model.lora import load_adapter, merge_lora


def run_export(config: Config, output: str, adapter: str | None = None, outtype: str = "f16",
               adapter_only: bool = False, base_gguf: str | None = None, progress: bool = True) -> list[str]:
    """Write the GGUF file (and its Modelfile); returns the commands that run it."""
    if config.method == "span":
        raise ValueError("a --method span run reads answers off a span head; it is not a causal LM and has no GGUF export")
    if adapter_only and not adapter:
        raise ValueError("--adapter-only needs --adapter")
    output_path = Path(output)
    if output_path.suffix != ".gguf":
        raise ValueError(f"--output {output}: give a file name ending in .gguf")
    model, tokenizer, _ = load_base(config)
    architecture(model.config)  # refused here, before any work, when llama.cpp has no such architecture
    if adapter_only:
        write_adapter(load_adapter(model, adapter, config), output_path, progress)
        base = base_gguf or (config.model if config.model.endswith(".gguf") else None)
        if base is None:
            base = str(output_path.with_name("base.gguf"))
            log(f"the adapter needs its base model as GGUF: loraqa export --model {config.model} --output {base}")
        model_path, adapter_path = Path(base), output_path
    else:
        if adapter:
            model = merge_lora(load_adapter(model, adapter, config))  # fp32 weights, each LoRA delta added
        write_model(model, tokenizer, output_path, outtype, name=output_path.stem, progress=progress)
        model_path, adapter_path = output_path, None
    modelfile_path = output_path.with_suffix(".Modelfile")
    # Ollama resolves FROM and ADAPTER beside the Modelfile
    source = f"./{model_path.name}" if model_path.parent == output_path.parent else str(model_path.resolve())
    adapter_source = f"./{adapter_path.name}" if adapter_path else None
    write_text_atomic(modelfile_path, modelfile(source, config.template, tokenizer.eos_token or "",
                                                config.max_new_tokens, adapter_source))
    log(f"Ollama Modelfile: {modelfile_path}")
    return commands(model_path, modelfile_path, config.template, config.max_new_tokens, adapter_path)
