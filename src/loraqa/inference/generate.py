"""Batched greedy decoding with the KV cache, stopping at EOS or a newline.

Questions about the same passage share its prefill (``model.prefix``): the passage runs once and
its keys and values are copied to each question's row. Prompts are left-padded so each row's next
token lands in the same column; position ids count only real tokens, so a padded row computes what
it would alone. Rows are prefilled in runs of similar width, so little padding is computed. Each
row stops at its first stop token and leaves the batch (its rows of the cache dropped); the batch
stops when every row has. The cache is a ``StaticCache`` written in place, its rows in memory that
every batch reuses (why: docs/design-notes.md). A LoRA adapter arrives merged
(``model.lora.merge_for_answering``).
"""

from __future__ import annotations

import inspect

import torch
from torch.profiler import record_function
from tqdm.auto import tqdm
from transformers import StaticCache

from loraqa.data.batching import collate_shared_prefix, shared_prefix_batches
from loraqa.data.features import Feature, median_batch, no_answer_token
from loraqa.data.prompt import cut_answer
from loraqa.inference.constrain import ContextConstraint
from loraqa.inference.settings import DecodeSettings
from loraqa.model.load import cache_kwarg
from loraqa.model.precision import autocast
from loraqa.model.prefix import (KVPool, compact_static, positions_after, prefill_runs, prefix_positions,
                                 spread_static)


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and every token whose text contains a newline (answers are one line)."""
    cached = getattr(tokenizer, "_loraqa_stop_ids", None)
    if cached is None:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        cached = sorted({i for i, t in enumerate(texts) if "\n" in t} | {tokenizer.eos_token_id})
        tokenizer._loraqa_stop_ids = cached
    return cached


def _prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, prefix, pool):
    """Prefill a batch into a fresh ``StaticCache``, its rows sorted widest first (``order``) so runs
    of similar width skip most of the padding (``model.prefix.prefill_runs``). Returns (the cache, the
    model's keywords for it, each row's last logits, the slot mask, position ids, ``order``, the first
    slot of the answers)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    rows, width = input_ids.shape
    lengths = attention_mask.sum(-1)
    order = lengths.argsort(descending=True, stable=True)
    input_ids, attention_mask, lengths = input_ids[order], attention_mask[order], lengths[order]
    past = 0 if prefix is None else prefix[0].size(1)
    # one slot per column, filled left to right; the mask marks the filled real ones
    slots = past + width + max_new_tokens
    cache = StaticCache(config=lm.config, max_cache_len=slots)
    kw = {cache_kwarg(lm): cache, "use_cache": True}
    mask = attention_mask.new_zeros(rows, slots)
    if prefix is None:
        past_mask = attention_mask.new_zeros(rows, 0)
    else:
        prefix_ids, prefix_mask, row_prefix = prefix
        prefix_lengths = prefix_mask.sum(-1)
        group_order = prefix_lengths.argsort(descending=True, stable=True)
        prefix_ids, prefix_mask = prefix_ids[group_order], prefix_mask[group_order]
        prefix_lengths = prefix_lengths[group_order]
        row_prefix = group_order.argsort()[row_prefix[order]]  # each (sorted) row's group, in the groups' new order
        prefix_full = prefix_mask.new_zeros(prefix_mask.size(0), slots)
        prefix_full[:, :past] = prefix_mask
        with record_function("prefill:passage"):
            prefill_runs(model, cache, prefix_ids, prefix_lengths.tolist(), prefix_full,
                         prefix_positions(prefix_mask), 0, kw)
        with record_function("cache:spread"):  # (G, ...) -> (B, ...): each row gets its group's prefix
            spread_static(cache, row_prefix, pool or KVPool())
        past_mask = prefix_mask[row_prefix]
    position_ids = positions_after(past_mask, attention_mask)
    mask[:, :past] = past_mask
    mask[:, past:past + width] = attention_mask
    with record_function("prefill:question"):
        logits = prefill_runs(model, cache, input_ids, lengths.tolist(), mask, position_ids, past, kw)
    return cache, kw, logits, mask, position_ids, order, past + width


@torch.inference_mode()
def greedy_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                    stop_ids: torch.Tensor, pad_id: int,
                    prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                    pool: KVPool | None = None,
                    watch_id: int | None = None, choose=None,
                    na_thresh: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """((B, <= max_new_tokens) generated ids, (B,) first-token probabilities of ``watch_id`` or None);
    a row ends with its first stop token, then pad_id. A row that has stopped leaves the batch (its
    keys and values too): the steps after compute only the rows still decoding. With ``watch_id`` = the no-answer token (EOS
    when no answer is the empty answer), the probabilities are SQuAD v2.0's no-answer probabilities.

    ``prefix`` = (prefix_ids (G, P), prefix_mask (G, P), row_prefix (B,)) is a left-padded prefix
    that several rows share (a passage read once for all its questions): it is prefilled once
    per group, its keys and values are copied to each of the group's rows (into ``pool``'s
    memory when given), and ``input_ids`` then hold each row's remainder. Without it
    ``input_ids`` are whole left-padded prompts. ``choose(logits, tokens so far, rows)`` replaces
    the argmax (``inference.constrain.ContextConstraint``). With ``na_thresh`` (and ``watch_id``), the first
    token is ``watch_id`` exactly where its probability is above ``na_thresh``, and elsewhere the
    likeliest other token: the threshold, not the argmax, decides whether to answer.
    """
    cache, kw, logits, mask, position_ids, order, first = _prefill(model, input_ids, attention_mask,
                                                                   max_new_tokens, prefix, pool)
    rows = input_ids.size(0)
    watched = None if watch_id is None else logits.float().softmax(-1)[:, watch_id]
    generated = input_ids.new_full((rows, max_new_tokens), pad_id)
    live = torch.arange(rows, device=input_ids.device)  # the rows still decoding, by their index in the batch
    so_far = [[] for _ in range(rows)]
    for step in range(max_new_tokens):
        if step == 0 and na_thresh is not None:
            abstain = watched > na_thresh
            logits = logits.clone()
            logits[~abstain, watch_id] = float("-inf")
        if choose is None:
            next_ids = logits.argmax(-1)  # (live rows,)
        else:
            rows_now = order[live].tolist()  # the rows' indices as the caller gave them
            next_ids = choose(logits, [so_far[r] for r in rows_now], rows_now)
            for r, t in zip(rows_now, next_ids.tolist()):
                so_far[r].append(t)
        if step == 0 and na_thresh is not None:
            next_ids = torch.where(abstain, watch_id, next_ids)
        generated[live, step] = next_ids
        going = ~torch.isin(next_ids, stop_ids)
        if not bool(going.any()) or step == max_new_tokens - 1:
            break
        if not bool(going.all()):  # rows that stopped leave the batch: later steps compute only the others
            with record_function("cache:compact"):
                keep = going.nonzero().squeeze(1)
                live, next_ids, mask, position_ids = live[keep], next_ids[keep], mask[keep], position_ids[keep]
                compact_static(cache, keep)
        mask[:, first + step] = 1
        position_ids = position_ids[:, -1:] + 1
        with record_function("decode:step"):
            logits = model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=position_ids, **kw).logits[:, -1]
    unsort = order.argsort()
    return generated[unsort, :step + 1], None if watched is None else watched[unsort]


def prefill_probe(model, features: list[Feature], batch_size: int, pad_id: int, device: torch.device):
    """A prefill of ``batch_size`` median-length prompts, for timing precisions."""
    batch = median_batch(features, batch_size, pad_id)
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    # a span head (``--method span``) scores every position: it takes no logits_to_keep
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(type(lm).forward).parameters else {}

    @torch.inference_mode()
    def step(precision: str) -> None:
        model.eval()
        with autocast(device, precision):
            model(input_ids=input_ids, attention_mask=attention_mask, **keep)

    return step


def answer_lengths(generated: torch.Tensor, stop_ids: list[int]) -> list[int]:
    """Each row's generated tokens up to and including its first stop token (all of them without one)."""
    stops = set(stop_ids)
    return [next((i + 1 for i, t in enumerate(row) if t in stops), len(row)) for row in generated.tolist()]


def decode_answers(tokenizer, generated: torch.Tensor, stop_ids: list[int]) -> list[str]:
    """Text of each row up to and including its first stop token, cut to one stripped line."""
    return [cut_answer(tokenizer.decode(row[:end], skip_special_tokens=True))
            for row, end in zip(generated.tolist(), answer_lengths(generated, stop_ids))]


def predict(model, tokenizer, features: list[Feature], settings: DecodeSettings, device: torch.device,
            precision: str = "fp32", *, contexts: dict[str, str] | None = None,
            na_probs: dict[str, float] | None = None, progress: bool = True) -> dict[str, str]:
    """{question id: answer} for every feature; questions on the same passage share its prefill.

    A batch holds at most ``settings.batch_size`` questions and ``settings.batch_tokens`` cached
    tokens (rows x (prompt + max_new_tokens)), so batches of long prompts are smaller. The model's
    "no answer" (EOS right after the cue, or ``no_answer_text`` when it was trained with one) is the
    empty answer; ``na_probs``, when given, is filled with each question's probability of it (of
    its first token, for a phrase), SQuAD v2.0's no-answer probability. With
    ``constrain_to_context``, every answer is a span of its passage, ``contexts[question id]``.
    With ``na_prob_thresh``, a question gets "no answer" exactly when that probability is above
    it, and otherwise an answer (see ``greedy_generate``).
    """
    if settings.constrain_to_context and contexts is None:
        raise ValueError("constrain_to_context needs each question's passage (contexts)")
    model.eval()
    no_answer = cut_answer(settings.no_answer_text)
    na_thresh, max_new_tokens = settings.na_prob_thresh, settings.max_new_tokens
    watch_id = (None if na_probs is None and na_thresh is None
                else no_answer_token(tokenizer, settings.no_answer_text))
    stop_list = stop_token_ids(tokenizer)
    stop_ids = torch.tensor(stop_list, device=device)
    pool = KVPool()
    predictions: dict[str, str] = {}
    bar = tqdm(total=len(features), desc="generate", unit="q", disable=not progress)
    batches = shared_prefix_batches(features, settings.batch_size, settings.batch_tokens, max_new_tokens)
    for groups in batches:
        t = {k: v.to(device) for k, v in collate_shared_prefix(groups, tokenizer.pad_token_id).items()}
        rows = [f for g in groups for f in g]
        choose = ContextConstraint(tokenizer, [contexts[f.id] for f in rows]) if settings.constrain_to_context else None
        with autocast(device, precision):
            generated, watched = greedy_generate(
                model, t["input_ids"], t["attention_mask"], max_new_tokens, stop_ids, tokenizer.pad_token_id,
                prefix=(t["prefix_ids"], t["prefix_mask"], t["row_prefix"]), pool=pool, watch_id=watch_id,
                choose=choose, na_thresh=na_thresh)
        abstained = [False] * len(rows) if na_thresh is None else (watched > na_thresh).tolist()
        for f, answer, abstain in zip(rows, decode_answers(tokenizer, generated.cpu(), stop_list), abstained):
            predictions[f.id] = "" if abstain or (no_answer and answer == no_answer) else answer
        if na_probs is not None:
            na_probs.update(zip((f.id for f in rows), watched.tolist()))
        bar.update(len(rows))
    bar.close()
    return predictions
