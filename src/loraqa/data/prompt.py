"""The prompt template, the training target, and cutting a generated answer.

    prompt:  "Context: {context}\\nQuestion: {question}\\nAnswer:"
    target:  " {answer}" + EOS   (tokenised on its own, so training sees exactly the tokens
                                  that greedy decoding must produce after the prompt)
"""

from __future__ import annotations

import re

from loraqa.data.examples import Example

DEFAULT_TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer:"
_PLACEHOLDER = re.compile(r"\{(context|question)\}")


def format_prompt(template: str, context: str, question: str) -> str:
    """Fill the template's placeholders once each; braces inside SQuAD text are left alone."""
    values = {"context": context, "question": question}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def context_span(template: str, context: str, question: str) -> tuple[int, int]:
    """Character span of the context inside ``format_prompt(template, context, question)``."""
    head = template.split("{context}")[0]
    start = len(format_prompt(head, "", question))
    return start, start + len(context)


def prompt_of(example: Example, template: str) -> str:
    return format_prompt(template, example.context, example.question)


def format_target(answer: str) -> str:
    """The answer as the model must continue the prompt: one leading space, EOS added by features."""
    return " " + answer.strip()


def cut_answer(generated: str) -> str:
    """The answer in a generated continuation: text before the first newline, stripped."""
    return generated.split("\n", 1)[0].strip()
