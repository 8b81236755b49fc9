"""How questions are answered, as one typed object (as training takes ``Config``): what evaluate,
ask, serve and the evaluation after training all pass to the decoder."""

from __future__ import annotations

from dataclasses import dataclass

from loraqa.config import Config
from loraqa.data.prompt import DEFAULT_TEMPLATE


@dataclass(frozen=True)
class DecodeSettings:
    max_length: int                  # prompt + answer budget in tokens (--max-length, capped by the model)
    template: str = DEFAULT_TEMPLATE
    max_new_tokens: int = 32         # longest answer; a span head's longest span
    draft_tokens: int = 8            # most tokens guessed from the passage per row and step (inference.lookup; 0: off)
    batch_size: int = 64             # most questions decoded together (--eval-batch-size)
    batch_tokens: int | None = None  # most cached tokens in a batch, rows x (prompt + new tokens)
    no_answer_text: str = ""         # what the model was trained to say for "no answer" ("": EOS at once)
    constrain_to_context: bool = False  # every answer a span of its passage (inference.constrain)
    na_prob_thresh: float | None = None  # "no answer" exactly where its probability is above this
    method: str = "lora"             # "span": read answers off a span head instead of generating
    doc_stride: int = 128            # tokens shared by neighbouring windows of a long passage
    window_tokens: int = 1024        # a passage longer than this is read in windows (inference.documents)
    windows_per_question: int = 3    # how many of them each question is read in
    allow_unanswerable: bool = False  # span: "no answer" may win (ask; evaluate decides by its data)

    @classmethod
    def from_config(cls, config: Config, max_length: int) -> DecodeSettings:
        """The run's settings, with ``max_length`` as resolved against the model."""
        return cls(max_length=max_length, template=config.template, max_new_tokens=config.max_new_tokens,
                   draft_tokens=config.draft_tokens,
                   batch_size=config.eval_batch_size, batch_tokens=config.eval_batch_tokens,
                   no_answer_text=config.no_answer_text, constrain_to_context=config.constrain_to_context,
                   na_prob_thresh=config.na_prob_thresh, method=config.method, doc_stride=config.doc_stride,
                   window_tokens=config.window_tokens, windows_per_question=config.windows_per_question,
                   allow_unanswerable=config.allow_unanswerable)
