from dataclasses import replace

import pytest
import torch

from loraqa.config import DEFAULT_TEMPLATE
from loraqa.data.batching import collate_shared_prefix, split_groups
from loraqa.data.features import build_eval_features
from loraqa.inference.constrain import ContextConstraint
from loraqa.inference.decoder import Batch, decode
from loraqa.model.support import DecodingSupport



def _batch(features, pad_id, tags):
    t = collate_shared_prefix(split_groups(features), pad_id)
    return Batch(t["input_ids"], t["attention_mask"], tags, (t["prefix_ids"], t["prefix_mask"], t["row_prefix"]))


def _two_batches(tokenizer, examples):
    """Two batches of the same questions, the second's passages cut short; (batches, rows a batch)."""
    first, _ = build_eval_features(tokenizer, examples, DEFAULT_TEMPLATE, 512, 8)
    # the second batch's prompts narrower than the first's: a carried row's filled slots go past theirs
    second, _ = build_eval_features(tokenizer, [replace(ex, context=ex.context[:40]) for ex in examples],
                                    DEFAULT_TEMPLATE, 512, 8)
    assert max(f.n_prompt for f in second) < max(f.n_prompt for f in first)
    pad, n = tokenizer.pad_token_id, len(first)
    return [_batch(first, pad, list(range(n))), _batch(second, pad, list(range(n, 2 * n)))], n


def _run(model, batches, stops, carry=True, choose=None, path=None, **options):
    """{tag: tokens} of 8 at most, and the forwards it took; ``options`` are ``decode``'s."""
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    support = None if path is None else DecodingSupport(path, "set by the test")
    try:
        with torch.inference_mode():
            out = {tag: tokens for tag, tokens, _ in decode(model, batches, 8, torch.tensor(stops), carry=carry,
                                                            choose=choose, support=support, **options)}
    finally:
        hook.remove()
    return out, len(calls)


@pytest.mark.parametrize("constrained", [False, True])
def test_carried_rows_decode_as_they_would_to_their_batchs_end(tiny_model, tokenizer, examples, constrained):
    """A batch's last row, carried into the next batch (narrower prompts, other rows, a fresh
    cache), produces exactly the tokens it produces when its batch decodes to its end, in fewer
    forward calls."""
    batches, n = _two_batches(tokenizer, examples)
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


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_passages_read_once_decode_as_copies_in_every_row(arch, tiny_model_dir, tiny_llama_dir, tokenizer, examples,
                                                          monkeypatch):
    """Each passage's keys and values kept once beside the rows' cache (model.prefix_attention)
    give the tokens that copying them into every row gives, with rows leaving and carried into
    the next batch; the rows' own cache then holds no passage."""
    from transformers import AttentionInterface

    from loraqa.model.load import load_model
    from loraqa.model.prefix_attention import NAME

    model = load_model(str(tiny_llama_dir if arch == "llama" else tiny_model_dir)).eval()
    batches, n = _two_batches(tokenizer, examples)
    full, _ = _run(model, batches, [-1], False, None)
    stops = sorted({full[t][1] for t in range(n)} - set(full[0]))  # rows end at different steps, row 0 runs on
    widths, attend = [], AttentionInterface._global_mapping[NAME]

    def spy(module, query, key, value, mask, shared_prefix=None, **kw):
        if shared_prefix is not None and module.layer_idx == 0:
            widths.append(key.size(2))
        return attend(module, query, key, value, mask, shared_prefix=shared_prefix, **kw)

    monkeypatch.setitem(AttentionInterface._global_mapping, NAME, spy)
    shared, _ = _run(model, batches, stops, True, None)
    longest_passage = max(b.prefix[0].size(1) for b in batches)
    # the rows' own columns: their question and answer, and a carried row's few more; no passage
    assert widths and max(widths) <= 2 * (max(b.input_ids.size(1) for b in batches) + 8) < longest_passage
    widths.clear()
    copied, _ = _run(model, batches, stops, True, None, path="copies")
    assert not widths  # the copies' path: transformers' own attention
    assert shared == copied and set(shared) == set(range(2 * n))
    assert len({len(t) for t in shared.values()}) > 1


def test_a_row_whose_listener_is_gone_ends_at_its_next_token(tiny_model, tokenizer, examples):
    """``on_token`` returning true (a streaming client went away) ends that row there; the others
    decode exactly as they would."""
    batches, n = _two_batches(tokenizer, examples)
    model = tiny_model.eval()
    full, _ = _run(model, batches[:1], [-1], False, None)
    heard = []

    def on_token(tag, token):
        heard.append(tag)
        return tag == 0  # row 0's client is gone after its first token

    with torch.inference_mode():
        out = {tag: tokens for tag, tokens, _ in decode(model, batches[:1], 8, torch.tensor([-1]), on_token=on_token)}
    assert out[0] == full[0][:1] and heard.count(0) == 1
    assert all(out[t] == full[t] for t in range(1, n)) and all(len(full[t]) == 8 for t in range(n))
