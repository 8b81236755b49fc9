"""An Ollama ``Modelfile`` beside an exported GGUF file, and the commands that run it.

Ollama fills a Go template from a request's ``system`` and ``prompt``; the run's prompt template has
a passage and a question, so the passage is the system message and the question the prompt
(``{context}`` -> ``{{ .System }}``, ``{question}`` -> ``{{ .Prompt }}``). Decoding is greedy and
stops, as loraqa's does, at EOS or a newline.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraqa.data.prompt import format_prompt


def ollama_template(template: str) -> str:
    """The run's prompt template in Ollama's Go template syntax."""
    if "{{" in template or "}}" in template:
        raise ValueError("export: the prompt template holds '{{' or '}}', which Ollama's templates cannot quote")
    return template.replace("{context}", "{{ .System }}").replace("{question}", "{{ .Prompt }}")


def modelfile(source: str, template: str, eos_text: str, max_new_tokens: int, adapter: str | None = None) -> str:
    """The text of a Modelfile: FROM the model (and ADAPTER), the template, greedy stop rules."""
    lines = [f"FROM {source}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    lines += [f'TEMPLATE """{ollama_template(template)}"""',
              "PARAMETER temperature 0",
              "PARAMETER top_k 1",
              f"PARAMETER num_predict {max_new_tokens}",
              f"PARAMETER stop {json.dumps(chr(10))}"]
    if eos_text:
        lines.append(f"PARAMETER stop {json.dumps(eos_text)}")
    return "\n".join(lines) + "\n"


def commands(model_path: Path, modelfile_path: Path, template: str, max_new_tokens: int,
             adapter_path: Path | None = None) -> list[str]:
    """The llama.cpp and Ollama commands that answer one question with the exported file."""
    # filled as prompts are (data.prompt): a template may hold other braces, which str.format would refuse
    example = format_prompt(template, "The mill was rebuilt in 1887.", "When was the mill rebuilt?")
    lora = f" --lora {adapter_path}" if adapter_path else ""
    name = model_path.stem.lower().replace("_", "-")
    return [f"llama-cli -m {model_path}{lora} -no-cnv --temp 0 -n {max_new_tokens} -p {json.dumps(example)}",
            f"ollama create {name} -f {modelfile_path}",
            "curl http://localhost:11434/api/generate -d '" + json.dumps(
                {"model": name, "system": "The mill was rebuilt in 1887.", "prompt": "When was the mill rebuilt?",
                 "stream": False}) + "'"]


