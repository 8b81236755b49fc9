"""The reference path: transformers' own greedy ``generate``, one question at a time.

What answering's fast paths must equal, and what answers the questions they cannot take
(``model.support``): models whose layers keep caches of their own, questions longer than a sliding
window. Slow (one row per forward, each passage prefilled for each of its questions), exact by
definition. loraqa's token rules run inside ``generate`` as a logits processor, the same rules
``inference.decoder`` applies: ``choose`` (answers held to the passage), the no-answer token's
probability watched at the first token and, with a threshold, deciding it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from loraqa.model.multilora import routing


class _Rules(LogitsProcessor):
    """One row's token rules: every step leaves only the token loraqa's decoder would pick."""

    def __init__(self, tag, prompt_length: int, choose, watch_id: int | None, na_thresh: float | None):
        self.tag, self.prompt_length, self.choose = tag, prompt_length, choose
        self.watch_id, self.na_thresh, self.watched = watch_id, na_thresh, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        made = input_ids[0, self.prompt_length:].tolist()
        logits, forced = scores, None
        if not made and self.watch_id is not None:
            self.watched = float(scores[0].float().softmax(-1)[self.watch_id])
            if self.na_thresh is not None:
                if self.watched > self.na_thresh:
                    forced = self.watch_id
                else:
                    logits = scores.clone()
                    logits[0, self.watch_id] = float("-inf")
        if forced is None:
            forced = int(logits.argmax(-1)[0] if self.choose is None else self.choose(logits, [made], [self.tag])[0])
        only = torch.full_like(scores, float("-inf"))
        only[0, forced] = 0.0
        return only


@contextmanager
def greedy_only(model):
    """``generate`` fills what a call leaves unset from the model's own generation config (a
    repetition penalty, sampling): for the reference, nothing but greedy decoding."""
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@torch.inference_mode()
def generate_each(model, prompts: Iterable[tuple[object, list[int]]], max_new_tokens: int, stop_ids: torch.Tensor,
                  *, choose=None, watch_id: int | None = None, na_thresh: float | None = None,
                  adapters: dict | None = None, on_token=None) -> Iterator[tuple[object, list[int], float | None]]:
    """For each (tag, prompt ids): (tag, its tokens up to and including its first stop token, at
    most ``max_new_tokens``; the probability its first token was ``watch_id``), as
    ``inference.decoder.decode`` yields them; ``adapters`` ({tag: LoRA adapter}) and ``on_token``
    as there (the tokens are heard when the question ends)."""
    device = next(model.parameters()).device
    stops = stop_ids.tolist()
    with greedy_only(model):
        for tag, prompt in prompts:
            ids = torch.tensor([prompt], dtype=torch.long, device=device)
            rules = _Rules(tag, len(prompt), choose, watch_id, na_thresh)
            with routing(model, [adapters[tag]] if adapters else None):
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, num_beams=1, eos_token_id=stops, pad_token_id=stops[0],
                                     logits_processor=LogitsProcessorList([rules]))
            tokens = out[0, len(prompt):].tolist()
            end = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
            for token in tokens[:end] if on_token is not None else ():
                on_token(tag, token)
            yield tag, tokens[:end], rules.watched
