"""Which path answers a model, checked before it is trusted.

``model.support`` picks the fastest path that can be exact from the model's config and modules. A
family or a setting nobody listed there could still make that path compute something else, so the
first time a model answers in float32 the path's logits on a few of the run's own questions (one
passage's, rows of different widths, a few decoding steps, guesses from the prompts among them)
are compared with transformers' ``generate`` one question at a time. A path that differs, or
fails, hands over to the next slower one (shared -> copies -> generate), said in one log line; the
decision is kept on the model.

A check costs a few ``generate`` calls (1.5 s of a cold ``loraqa ask`` on SmolLM2), so ``ask`` and
``serve`` also keep its decision in loraqa's cache folder (``checks/``), under a key made of what
decides it (``model.recall.check_key``: the weights' sha256, the model's config, the adapter's files, the
loraqa, transformers and torch versions, the weights' dtype and the device); a model whose key is
recorded takes the recorded path, and any change of them checks again.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from loraqa.data.batching import collate_shared_prefix, shared_prefix_batches
from loraqa.data.features import Feature
from loraqa.inference.decoder import Batch, decode
from loraqa.inference.lookup import PromptLookup
from loraqa.inference.reference import greedy_only
from loraqa.io import log
from loraqa.model.load import base_model
from loraqa.model.recall import recalled, remember
from loraqa.model.support import DecodingSupport, decoding_support

CHECKED = "_loraqa_decoding"  # the attribute that keeps a model's checked path
CHECK_QUESTIONS = 3
CHECK_STEPS = 4
# logits that differ by more than this share of their largest are another computation: float32
# orderings differ by ~1e-6 of it; a wrong mask, window or position by 1e-2 and more
TOLERANCE = 1e-3


def support_for(model) -> DecodingSupport:
    """The model's checked path, or the one its config and modules allow."""
    lm = base_model(model)
    return getattr(lm, CHECKED, None) or decoding_support(lm)


def check_support(model, features: list[Feature], pad_id: int, max_new_tokens: int,
                  key: str | None = None) -> DecodingSupport:
    """The fastest path whose logits equal ``generate``'s on a few of ``features`` (float32 models;
    others keep :func:`support_for`'s, unchecked). Kept on the model: checked once; with ``key``
    (``model.recall.check_key``), kept in the cache too, and taken from there."""
    lm = base_model(model)
    support = support_for(model)
    if support.checked or support.path == "generate" or next(lm.parameters()).dtype != torch.float32:
        return support
    recorded = recalled(key)
    if recorded is not None and recorded.get("path") in ("shared", "copies", "generate"):
        support = replace(support, path=recorded["path"], why=recorded["why"], checked=True)
        setattr(lm, CHECKED, support)
        return support
    sample = [f for f in features if support.fits(f.n_prompt + max_new_tokens)][:CHECK_QUESTIONS]
    if not sample:
        return support
    was = model.training
    model.eval()
    try:
        while support.path != "generate":
            problem = _differs(model, sample, pad_id, support)
            if problem is None:
                break
            support = support.fallback(f"the {support.path} path {problem}")
            log(f"answering: {type(lm).__name__} is answered by the {support.path} path ({support.why})")
    finally:
        model.train(was)
    support = replace(support, checked=True)
    setattr(lm, CHECKED, support)
    remember(key, {"path": support.path, "why": support.why}, "the path check")
    return support




def _differs(model, sample: list[Feature], pad_id: int, support: DecodingSupport) -> str | None:
    """None where ``support``'s path gives ``generate``'s logits on ``sample``, else what differs."""
    ours: dict[tuple[int, int], torch.Tensor] = {}

    def record(logits, made, tags):
        for row, tag in enumerate(tags):
            ours[(tag, len(made[row]))] = logits[row].float()
        return logits.argmax(-1)

    groups = [g for b in shared_prefix_batches(sample, len(sample)) for g in b]  # one batch of them all
    order = [f for g in groups for f in g]  # its rows
    device = next(model.parameters()).device
    t = {k: v.to(device) for k, v in collate_shared_prefix(groups, pad_id).items()}
    never = torch.tensor([-1], device=device)
    batch = Batch(t["input_ids"], t["attention_mask"], list(range(len(order))),
                  (t["prefix_ids"], t["prefix_mask"], t["row_prefix"]))
    try:
        with torch.inference_mode():
            # guesses from the prompts, as answering makes them: a guessing step's logits are checked too
            made = {tag: tokens for tag, tokens, _ in decode(model, [batch], CHECK_STEPS, never, choose=record,
                                                            support=support,
                                                            draft=PromptLookup([f.input_ids for f in order]))}
    except Exception as e:  # noqa: BLE001 - any failure of a fast path on this model hands over to the next path
        return f"fails on it ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
    worst = 0.0
    for tag, f in enumerate(order):
        tokens, logits = _reference(model, f.input_ids, CHECK_STEPS)
        for step, expected in enumerate(logits):
            got = ours[(tag, step)]
            worst = max(worst, float((got - expected).abs().max() / expected.abs().max().clamp(min=1.0)))
            if made[tag][step] != tokens[step]:
                break  # a near tie chosen the other way: later steps follow other tokens
    return None if worst <= TOLERANCE else f"differs from transformers' generate (logits by {worst:.2g} of their size)"


@torch.inference_mode()
def _reference(model, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy tokens and each step's logits for one prompt, no stop token."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    with greedy_only(model):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                             min_new_tokens=steps, do_sample=False, num_beams=1, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), [x[0].float() for x in out.logits]
