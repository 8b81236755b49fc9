"""Answering a list of questions: prompts batched by passage, decoded greedily
(``inference.decoder``), each answer cut at its first stop token (EOS or a newline)."""

from __future__ import annotations

import inspect
import itertools

import torch
from tqdm.auto import tqdm

from loraqa.data.batching import collate_shared_prefix, kept_groups, shared_prefix_batches
from loraqa.data.features import Feature, median_batch, no_answer_token
from loraqa.data.prompt import cut_answer
from loraqa.inference.constrain import ContextConstraint
from loraqa.inference.decoder import Batch, decode
from loraqa.inference.lookup import PromptLookup
from loraqa.inference.paths import check_support
from loraqa.inference.reference import generate_each
from loraqa.inference.rivals import Rivals
from loraqa.inference.settings import DecodeSettings
from loraqa.io import log
from loraqa.model.load import base_model
from loraqa.model.passage_store import PassageStore
from loraqa.model.precision import autocast
from loraqa.model.prefix import KVPool


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and every token whose text contains a newline (answers are one line)."""
    cached = getattr(tokenizer, "_loraqa_stop_ids", None)
    if cached is None:
        # the Rust tokenizer's batch decode: the same texts as ``batch_decode``, 10x sooner (0.04 s for 49k tokens)
        texts = tokenizer.backend_tokenizer.decode_batch([[i] for i in range(len(tokenizer))], skip_special_tokens=False)
        cached = sorted({i for i, t in enumerate(texts) if "\n" in t} | {tokenizer.eos_token_id})
        tokenizer._loraqa_stop_ids = cached
    return cached


def prefill_probe(model, features: list[Feature], batch_size: int, pad_id: int, device: torch.device):
    """A prefill of ``batch_size`` median-length prompts, for timing precisions."""
    batch = median_batch(features, batch_size, pad_id)
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)

    lm = base_model(model)
    # a span head (``--method span``) scores every position: it takes no logits_to_keep
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(type(lm).forward).parameters else {}

    @torch.inference_mode()
    def step(precision: str) -> None:
        model.eval()
        with autocast(device, precision):
            model(input_ids=input_ids, attention_mask=attention_mask, **keep)

    return step


def answer_text(tokenizer, tokens: list[int]) -> str:
    """A row's answer: its tokens' text (up to its stop token, which may carry text), one stripped line."""
    return cut_answer(tokenizer.decode(tokens, skip_special_tokens=True))


def split_by_path(model, features: list[Feature], pad_id: int, max_new_tokens: int, route: dict | None = None):
    """(the model's checked path, the questions it takes, those transformers' ``generate`` answers
    one at a time: all of them for a model only it answers exactly, else those longer than a window)."""
    support = check_support(model, features, pad_id, max_new_tokens)
    takes = [support.path != "generate" and support.fits(f.n_prompt + max_new_tokens) for f in features]
    fast = [f for f, t in zip(features, takes) if t]
    slow = [f for f, t in zip(features, takes) if not t]
    if slow:
        why = support.why if support.path == "generate" else support.too_long()
        log(f"{len(slow)} of {len(features)} questions answered by transformers' generate, one at a time ({why})")
    if route is not None:
        route.update({"path": support.path, "fast": len(fast), "generate": len(slow)})
    return support, fast, slow


def predict(model, tokenizer, features: list[Feature], settings: DecodeSettings, device: torch.device,
            precision: str = "fp32", *, contexts: dict[str, str] | None = None,
            na_probs: dict[str, float] | None = None, progress: bool = True,
            route: dict | None = None, adapters: dict[str, str] | None = None, on_token=None,
            passages: PassageStore | None = None) -> dict[str, str]:
    """{question id: answer} for every feature; questions on the same passage share its prefill.

    A batch holds at most ``settings.batch_size`` questions and ``settings.batch_tokens`` cached
    tokens (rows x (prompt + max_new_tokens)), so batches of long prompts are smaller; a batch's
    last rows, carried into the next (``inference.decoder``), add at most a quarter. The model's
    "no answer" (EOS right after the cue, or ``no_answer_text`` when it was trained with one) is the
    empty answer; ``na_probs``, when given, is filled with each question's probability of it (of
    its first token, for a phrase), SQuAD v2.0's no-answer probability. With
    ``constrain_to_context``, every answer is a span of its passage, ``contexts[question id]``.
    With ``na_prob_thresh``, a question gets "no answer" exactly when that probability is above
    it, and otherwise an answer (see ``inference.decoder.decode``).

    The path is the model's (``inference.paths``); questions it cannot take (longer than a sliding
    window, or a model only ``generate`` answers exactly) are answered by transformers' ``generate``
    one at a time, said in one log line. ``route``, when given, gets the path and both counts.

    ``adapters`` ({question id: LoRA adapter name}, for a PEFT model holding several: ``model.adapters``)
    answers each question with its own adapter, questions of several adapters in one batch (a
    passage's prefill shared only among questions of one adapter). ``on_token(question id, token)``
    hears each answer's tokens as they are chosen. ``passages`` keeps documents' windows' keys and values
    from batch to batch (``model.passage_store``).
    """
    if settings.constrain_to_context and contexts is None:
        raise ValueError("constrain_to_context needs each question's passage (contexts)")
    model.eval()
    no_answer = cut_answer(settings.no_answer_text)
    na_thresh, max_new_tokens = settings.na_prob_thresh, settings.max_new_tokens
    watch_id = (None if na_probs is None and na_thresh is None
                else no_answer_token(tokenizer, settings.no_answer_text))
    stop_ids = torch.tensor(stop_token_ids(tokenizer), device=device)
    # tags: each row's index in ``features``, for the answer and (constrained) its passage
    where = {f.id: i for i, f in enumerate(features)}
    choose = (ContextConstraint(tokenizer, [contexts[f.id] for f in features]) if settings.constrain_to_context
              else None)
    support, fast, slow = split_by_path(model, features, tokenizer.pad_token_id, max_new_tokens, route)

    def batches():
        for groups in shared_prefix_batches(fast, settings.batch_size, settings.batch_tokens, max_new_tokens,
                                            kind=adapters):
            t = {k: v.to(device) for k, v in collate_shared_prefix(groups, tokenizer.pad_token_id).items()}
            yield Batch(t["input_ids"], t["attention_mask"], [where[f.id] for g in groups for f in g],
                        (t["prefix_ids"], t["prefix_mask"], t["row_prefix"]),
                        None if adapters is None else [adapters[f.id] for g in groups for f in g], kept_groups(groups))

    predictions: dict[str, str] = {}
    bar = tqdm(total=len(features), desc="generate", unit="q", disable=not progress)
    heard = None if on_token is None else (lambda i, token: on_token(features[i].id, token))
    options = {"choose": choose, "watch_id": watch_id, "na_thresh": na_thresh, "on_token": heard}
    by_row = None if adapters is None else {where[f.id]: adapters[f.id] for f in slow}
    # a document's question read in several windows: rows whose answer cannot be chosen end early
    rivals = Rivals.of(tokenizer, features, no_answer, na_thresh) if watch_id is not None else None
    # an answer copies its passage: guesses at its next tokens from the prompt, checked in one forward
    draft = (PromptLookup([f.input_ids[:f.n_prompt] for f in features], settings.draft_tokens)
             if settings.draft_tokens else None)
    with torch.inference_mode(), autocast(device, precision):
        answered = itertools.chain(
            decode(model, batches(), max_new_tokens, stop_ids, KVPool(), support=support, passages=passages,
                   prune=rivals, draft=draft, **options) if fast else (),
            generate_each(model, ((where[f.id], f.input_ids) for f in slow), max_new_tokens, stop_ids,
                          adapters=by_row, **options))
        for i, tokens, watched in answered:
            answer = answer_text(tokenizer, tokens)
            abstain = na_thresh is not None and watched > na_thresh
            predictions[features[i].id] = "" if abstain or (no_answer and answer == no_answer) else answer
            if rivals is not None:
                rivals.ended(i, predictions[features[i].id], watched)
            if na_probs is not None:
                na_probs[features[i].id] = watched
            bar.update()
    bar.close()
    return {f.id: predictions[f.id] for f in features}
