from dataclasses import replace

import pytest
import torch

from loraqa.config import DEFAULT_TEMPLATE
from loraqa.data.batching import collate_shared_prefix, split_groups
from loraqa.data.features import build_eval_features
from loraqa.inference.constrain import ContextConstraint
from loraqa.inference.decoder import Batch, decode



def _batch(features, pad_id, tags):
    t = collate_shared_prefix(split_groups(features), pad_id)
    return Batch(t["input_ids"], t["attention_mask"], tags, (t["prefix_ids"], t["prefix_mask"], t["row_prefix"]))


def _run(model, batches, stops, carry, choose):
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    try:
        with torch.inference_mode():
            out = {tag: tokens for tag, tokens, _ in decode(model, batches, 8, torch.tensor(stops), carry=carry,
                                                            choose=choose)}
    finally:
        hook.remove()
    return out, len(calls)


@pytest.mark.parametrize("constrained", [False, True])
def test_carried_rows_decode_as_they_would_to_their_batchs_end(tiny_model, tokenizer, examples, constrained):
    """A batch's last row, carried into the next batch (narrower prompts, other rows, a fresh
    cache), produces exactly the tokens it produces when its batch decodes to its end, in fewer
    forward calls."""
    first, _ = build_eval_features(tokenizer, examples, DEFAULT_TEMPLATE, 512, 8)
    # the second batch's prompts narrower than the first's: the carried row's filled slots go past theirs
    second, _ = build_eval_features(tokenizer, [replace(ex, context=ex.context[:40]) for ex in examples],
                                    DEFAULT_TEMPLATE, 512, 8)
    assert max(f.n_prompt for f in second) < max(f.n_prompt for f in first)
    pad, n = tokenizer.pad_token_id, len(first)
    batches = [_batch(first, pad, list(range(n))), _batch(second, pad, list(range(n, 2 * n)))]
    rule = ContextConstraint(tokenizer, [ex.context for ex in examples] * 2)
    choose = rule if constrained else None
    model = tiny_model.eval()
    full, _ = _run(model, batches, [-1], False, choose)
    # stop tokens that end every first-batch row but one at its first or second token
    def stops_keeping(row):
        return sorted({full[t][1] for t in range(n)} - set(full[row]))
    stops = max((stops_keeping(r) for r in range(n)),
                key=lambda s: sum(any(tok in s for tok in full[t][:2]) for t in range(n)))
    alone, alone_calls = _run(model, batches, stops, False, choose)
    carried, carried_calls = _run(model, batches, stops, True, choose)
    assert carried == alone and set(carried) == set(range(2 * n))
    lengths = sorted(len(alone[t]) for t in range(n))
    assert lengths[-1] == 8 and lengths[-2] <= 2  # the precondition: one row to carry
    assert carried_calls < alone_calls


def test_key_value_heads_shared_give_the_same_numbers_as_copied(tiny_llama_dir):
    """A grouped-query model (the tiny Llama: fewer key/value heads than query heads): a masked
    prefill over a partly filled cache, with transformers' copies (repeat_kv) and with the heads
    shared (kv_heads_shared), computes the same logits to the bit; the setting is restored after."""
    import os

    from transformers import StaticCache

    from loraqa.inference.decoder import kv_heads_shared
    from loraqa.model.load import cache_kwarg, load_model

    model = load_model(str(tiny_llama_dir)).eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[0, :4] = 0  # a left-padded row
    mask[:, 9:] = 0  # slots not written yet

    def logits():
        cache = StaticCache(config=model.config, max_cache_len=16)
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask, position_ids=(mask[:, :9].cumsum(-1) - 1).clamp(min=0),
                         **{cache_kwarg(model): cache, "use_cache": True}).logits

    from transformers.integrations import sdpa_attention

    copies, repeat_kv = [], sdpa_attention.repeat_kv
    before = os.environ.pop("TRANSFORMERS_SDPA_FORCE_GQA", None)
    sdpa_attention.repeat_kv = lambda *a: copies.append(1) or repeat_kv(*a)
    try:
        copied = logits()
        made = len(copies)
        with kv_heads_shared(torch.device("cpu"), torch.float32):
            assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"
            shared = logits()
        assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
        for off in (kv_heads_shared(torch.device("cpu"), torch.bfloat16),  # bf16: kept as transformers does it
                    kv_heads_shared(torch.device("meta"), torch.float32)):  # not a CPU
            with off:
                assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    finally:
        sdpa_attention.repeat_kv = repeat_kv
        if before is not None:
            os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = before
    assert made > 0 and len(copies) == made  # copied without, shared with
    assert torch.equal(copied, shared)
