"""Batched greedy decoding with the KV cache, stopping at EOS or a newline.

Prompts are left-padded (``features.collate_prompts``) so each row's next token is appended at
the same column; position ids count only real tokens, so a padded row computes what it would
alone. Each row stops at its first stop token; the batch stops when every row has.
"""

from __future__ import annotations

import inspect

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from loraqa.features import Feature, collate_prompts
from loraqa.model import autocast
from loraqa.prompt import cut_answer


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and every token whose text contains a newline (answers are one line)."""
    cached = getattr(tokenizer, "_loraqa_stop_ids", None)
    if cached is None:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        cached = sorted({i for i, t in enumerate(texts) if "\n" in t} | {tokenizer.eos_token_id})
        tokenizer._loraqa_stop_ids = cached
    return cached


def _cache_kwarg(lm) -> str:
    # transformers renamed `past_key_values` to `cache` during 5.x; accept both
    return "cache" if "cache" in inspect.signature(type(lm).forward).parameters else "past_key_values"


@torch.inference_mode()
def greedy_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                    stop_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, <= max_new_tokens) generated ids; a row ends with its first stop token, then pad_id."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache = {_cache_kwarg(lm): DynamicCache(config=lm.config)}  # filled in place by each call
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens count 0, 1, ...
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1, **cache)
    done = torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)
    steps = []
    for step in range(max_new_tokens):
        next_ids = out.logits[:, -1].argmax(-1)  # (B,)
        steps.append(torch.where(done, pad_id, next_ids))
        done |= torch.isin(next_ids, stop_ids)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.size(0), 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
        out = model(input_ids=next_ids[:, None], attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, **cache)
    return torch.stack(steps, dim=1)


def decode_answers(tokenizer, generated: torch.Tensor, stop_ids: list[int]) -> list[str]:
    """Text of each row up to and including its first stop token, cut to one stripped line."""
    stops = set(stop_ids)
    answers = []
    for row in generated.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        answers.append(cut_answer(tokenizer.decode(row[:end], skip_special_tokens=True)))
    return answers


def predict(model, tokenizer, features: list[Feature], batch_size: int, max_new_tokens: int,
            device: torch.device, precision: str = "fp32", progress: bool = True) -> dict[str, str]:
    """{question id: answer} for every feature, decoding longest prompts first."""
    model.eval()
    stop_list = stop_token_ids(tokenizer)
    stop_ids = torch.tensor(stop_list, device=device)
    order = sorted(features, key=lambda f: f.n_prompt, reverse=True)
    predictions: dict[str, str] = {}
    bar = tqdm(total=len(order), desc="generate", unit="q", disable=not progress)
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        inputs = {k: v.to(device) for k, v in collate_prompts(batch, tokenizer.pad_token_id).items()}
        with autocast(device, precision):
            generated = greedy_generate(model, inputs["input_ids"], inputs["attention_mask"],
                                        max_new_tokens, stop_ids, tokenizer.pad_token_id)
        for f, answer in zip(batch, decode_answers(tokenizer, generated.cpu(), stop_list)):
            predictions[f.id] = answer
        bar.update(len(batch))
    bar.close()
    return predictions
