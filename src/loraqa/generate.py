"""Batched greedy decoding with the KV cache, stopping at EOS or a newline.

Questions about the same passage share their prompt's prefix: it is computed once and its keys
and values are copied to each question's row (on SQuAD ~5 questions a passage, and the passage is
most of the prompt, so most of the prefill). Prompts are left-padded so each row's next token is
appended at the same column; position ids count only real tokens, so a padded row computes what
it would alone. Each row stops at its first stop token; the batch stops when every row has.

Each batch's cache is a ``StaticCache``, written in place (a cache that grows by one token copies
every key and value at every step, which on a CPU took more time than the model itself), and its
rows live in a ``KVPool`` that every batch of a ``predict`` call reuses: the OS maps and
zero-fills a fresh tensor's pages on first touch, and for cache-sized tensors made anew each
batch that was a fifth of evaluation time in a profile on a 2-core CPU (GPT-2 shapes).
"""

from __future__ import annotations

import inspect

import torch
from tqdm.auto import tqdm
from transformers import StaticCache

from loraqa.batching import collate_shared_prefix, shared_prefix_batches
from loraqa.constrain import ContextConstraint
from loraqa.features import Feature, median_batch, no_answer_token
from loraqa.model import cache_kwarg
from loraqa.precision import autocast
from loraqa.prompt import cut_answer


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and every token whose text contains a newline (answers are one line)."""
    cached = getattr(tokenizer, "_loraqa_stop_ids", None)
    if cached is None:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        cached = sorted({i for i, t in enumerate(texts) if "\n" in t} | {tokenizer.eos_token_id})
        tokenizer._loraqa_stop_ids = cached
    return cached


class KVPool:
    """Key/value memory that every batch's cache reuses: one flat buffer per layer and kind,
    regrown only when a batch needs more."""

    def __init__(self):
        self.buffers: dict[tuple[int, str], torch.Tensor] = {}

    def view(self, layer: int, kind: str, like: torch.Tensor, rows: int) -> torch.Tensor:
        """A contiguous (rows, *like.shape[1:]) tensor of ``like``'s dtype and device."""
        shape = (rows, *like.shape[1:])
        numel = torch.Size(shape).numel()
        buf = self.buffers.get((layer, kind))
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.buffers[(layer, kind)] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)


@torch.inference_mode()
def greedy_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                    stop_ids: torch.Tensor, pad_id: int,
                    prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                    pool: KVPool | None = None,
                    watch_id: int | None = None, choose=None,
                    na_thresh: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """((B, <= max_new_tokens) generated ids, (B,) first-token probabilities of ``watch_id`` or None);
    a row ends with its first stop token, then pad_id. With ``watch_id`` = the no-answer token (EOS
    when no answer is the empty answer), the probabilities are SQuAD v2.0's no-answer probabilities.

    ``prefix`` = (prefix_ids (G, P), prefix_mask (G, P), row_prefix (B,)) is a left-padded prefix
    that several rows share (a passage read once for all its questions): it is prefilled once
    per group, its keys and values are copied to each of the group's rows (into ``pool``'s
    memory when given), and ``input_ids`` then hold each row's remainder. Without it
    ``input_ids`` are whole left-padded prompts. ``choose(logits, tokens so far, done)`` replaces
    the argmax (``constrain.ContextConstraint``). With ``na_thresh`` (and ``watch_id``), the first
    token is ``watch_id`` exactly where its probability is above ``na_thresh``, and elsewhere the
    likeliest other token: the threshold, not the argmax, decides whether to answer.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    rows, width = input_ids.shape
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
        prefix_full = prefix_mask.new_zeros(prefix_mask.size(0), slots)
        prefix_full[:, :past] = prefix_mask
        model(input_ids=prefix_ids, attention_mask=prefix_full,
              position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0), logits_to_keep=1, **kw)
        _spread(cache, row_prefix, pool or KVPool())  # (G, ...) -> (B, ...): each row gets its group's prefix
        past_mask = prefix_mask[row_prefix]
    # real tokens count 0, 1, ... across prefix and remainder; pads are masked, whatever their position
    position_ids = past_mask.sum(-1, keepdim=True) + (attention_mask.cumsum(-1) - 1).clamp(min=0)
    mask[:, :past] = past_mask
    mask[:, past:past + width] = attention_mask
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=1, **kw)
    watched = None if watch_id is None else out.logits[:, -1].float().softmax(-1)[:, watch_id]
    done = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
    steps, so_far = [], [[] for _ in range(rows)]
    for step in range(max_new_tokens):
        logits = out.logits[:, -1]
        if step == 0 and na_thresh is not None:
            abstain = watched > na_thresh
            logits = logits.clone()
            logits[~abstain, watch_id] = float("-inf")
        next_ids = logits.argmax(-1) if choose is None else choose(logits, so_far, done)  # (B,)
        if step == 0 and na_thresh is not None:
            next_ids = torch.where(abstain, watch_id, next_ids)
        steps.append(torch.where(done, pad_id, next_ids))
        if choose is not None:
            for row, t in enumerate(next_ids.tolist()):
                so_far[row].append(t)
        done |= torch.isin(next_ids, stop_ids)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask[:, past + width + step] = 1
        position_ids = position_ids[:, -1:] + 1
        out = model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=position_ids, **kw)
    return torch.stack(steps, dim=1), watched


def _spread(cache: StaticCache, row_prefix: torch.Tensor, pool: KVPool) -> None:
    """Replace each layer's (G, ...) keys and values by (B, ...) ones, row i a copy of group
    ``row_prefix[i]`` (what ``reorder_cache`` does, but into ``pool``'s memory). The copied
    slots past the prefix are the lazily initialised zeros: masked slots must hold finite values."""
    for i, layer in enumerate(cache.layers):
        for kind in ("keys", "values"):
            src = getattr(layer, kind)
            setattr(layer, kind, torch.index_select(src, 0, row_prefix, out=pool.view(i, kind, src, len(row_prefix))))


def probe_step(model, features: list[Feature], batch_size: int, pad_id: int, device: torch.device):
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


def decode_answers(tokenizer, generated: torch.Tensor, stop_ids: list[int]) -> list[str]:
    """Text of each row up to and including its first stop token, cut to one stripped line."""
    stops = set(stop_ids)
    answers = []
    for row in generated.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        answers.append(cut_answer(tokenizer.decode(row[:end], skip_special_tokens=True)))
    return answers


def predict(model, tokenizer, features: list[Feature], batch_size: int, max_new_tokens: int,
            device: torch.device, precision: str = "fp32", progress: bool = True,
            batch_tokens: int | None = None, no_answer_text: str = "",
            na_probs: dict[str, float] | None = None, contexts: dict[str, str] | None = None,
            na_thresh: float | None = None) -> dict[str, str]:
    """{question id: answer} for every feature; questions on the same passage share its prefill.

    A batch holds at most ``batch_size`` questions and ``batch_tokens`` cached tokens (rows x
    (prompt + max_new_tokens)), so batches of long prompts are smaller. The model's "no answer"
    (EOS right after the cue, or ``no_answer_text`` when it was trained with one) is the empty
    answer; ``na_probs``, when given, is filled with each question's probability of it (of its
    first token, for a phrase), SQuAD v2.0's no-answer probability. With ``contexts`` ({question
    id: passage}), every answer is a span of its passage (``constrain.ContextConstraint``). With
    ``na_thresh``, a question gets "no answer" exactly when that probability is above it, and
    otherwise an answer (see ``greedy_generate``).
    """
    model.eval()
    no_answer = cut_answer(no_answer_text)
    watch_id = None if na_probs is None and na_thresh is None else no_answer_token(tokenizer, no_answer_text)
    stop_list = stop_token_ids(tokenizer)
    stop_ids = torch.tensor(stop_list, device=device)
    pool = KVPool()
    predictions: dict[str, str] = {}
    bar = tqdm(total=len(features), desc="generate", unit="q", disable=not progress)
    for groups in shared_prefix_batches(features, batch_size, batch_tokens, max_new_tokens) if features else []:
        t = {k: v.to(device) for k, v in collate_shared_prefix(groups, tokenizer.pad_token_id).items()}
        rows = [f for g in groups for f in g]
        choose = None if contexts is None else ContextConstraint(tokenizer, [contexts[f.id] for f in rows])
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
