import pytest
import torch
import torch.nn.functional as F

from loraqa.model.prefix_attention import SharedPrefix, prefix_attention, shared_prefix_attention


class Layer:  # what the attention function reads of its module
    layer_idx = 0
    is_causal = True


def _case(heads, kv_heads, tokens, dtype=torch.float32, seed=0):
    """Rows on three passages of different lengths (left-padded), each row's own columns partly
    masked: (query, key, value, own mask (R, 1, T, S), the SharedPrefix)."""
    g = torch.Generator().manual_seed(seed)
    rows, width, own, dim = 7, 6, 5, 8

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    pk, pv = randn(3, kv_heads, width, dim), randn(3, kv_heads, width, dim)
    mask = torch.ones(3, width, dtype=torch.bool)
    mask[1, :2] = mask[2, :4] = False  # shorter passages, left-padded
    row_group = torch.tensor([2, 0, 0, 1, 2, 2, 0])
    prefix = SharedPrefix([pk], [pv], mask, row_group)
    prefix.regroup(row_group)
    own_mask = torch.ones(rows, 1, tokens, own, dtype=torch.bool).tril(own - tokens)  # causal over the own columns
    own_mask[3, ..., :2] = False  # a left-padded row
    return randn(rows, heads, tokens, dim), randn(rows, kv_heads, own, dim), randn(rows, kv_heads, own, dim), own_mask, prefix


def _copied(query, key, value, own_mask, prefix):
    """The reference: each row's passage copied in front of its own columns, SDPA in float32."""
    group, rep = prefix.row_group, query.size(1) // key.size(1)
    keys = torch.cat([prefix.keys[0][group], key], 2).float().repeat_interleave(rep, 1)
    values = torch.cat([prefix.values[0][group], value], 2).float().repeat_interleave(rep, 1)
    mask = torch.cat([prefix.mask[group][:, None, None].expand(-1, 1, query.size(2), -1), own_mask], -1)
    return F.scaled_dot_product_attention(query.float(), keys, values, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("tokens", [1, 3])  # a decoding step, a prefill
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])  # plain, grouped-query
def test_each_passage_read_once_gives_what_copies_in_every_row_give(tokens, heads, kv_heads):
    query, key, value, own_mask, prefix = _case(heads, kv_heads, tokens)
    ours, _ = shared_prefix_attention(Layer(), query, key, value, own_mask, shared_prefix=prefix)
    assert ours.shape == (7, tokens, heads, 8)
    torch.testing.assert_close(ours, _copied(query, key, value, own_mask, prefix), rtol=1e-5, atol=1e-6)
    # a decoding step told its filled columns and their mask reads only those
    if tokens == 1:
        prefix.step(own_mask[:, 0, 0, :4])
        stepped, _ = shared_prefix_attention(Layer(), query, key, value, None, shared_prefix=prefix)
        torch.testing.assert_close(stepped, _copied(query, key[:, :, :4], value[:, :, :4], own_mask[..., :4], prefix),
                                   rtol=1e-5, atol=1e-6)


def test_bf16_is_scored_in_float32():
    """bf16 keys and queries: the products and softmax in float32 (as SDPA's kernels accumulate),
    only the output rounded to bf16."""
    query, key, value, own_mask, prefix = _case(6, 2, 1, torch.bfloat16)
    ours, _ = shared_prefix_attention(Layer(), query, key, value, own_mask, shared_prefix=prefix)
    assert ours.dtype == torch.bfloat16
    reference = _copied(query, key, value, own_mask, prefix)  # float32
    torch.testing.assert_close(ours.float(), reference, rtol=2 ** -8, atol=2 ** -10)  # within bf16's last bit


def test_rows_that_leave_or_join_keep_their_own_passage():
    query, key, value, own_mask, prefix = _case(4, 4, 1)
    before, _ = shared_prefix_attention(Layer(), query, key, value, own_mask, shared_prefix=prefix)
    rows = torch.tensor([1, 6])  # both on passage 0
    carried = SharedPrefix(prefix.keys, prefix.values, prefix.mask, prefix.row_group[rows]).reading()
    assert carried.mask.size(0) == 1  # only the passage its rows read
    prefix.keep(rows)  # the other two passages are half or more of three: dropped
    assert prefix.mask.size(0) == 1 and prefix.keys[0].size(0) == 1
    after, _ = shared_prefix_attention(Layer(), query[rows], key[rows], value[rows], own_mask[rows], shared_prefix=prefix)
    torch.testing.assert_close(after, before[rows], rtol=1e-5, atol=1e-6)
    # carried into a batch whose passages are wider (12 slots): the carried passage goes into the
    # room after them, its slots past its own 6 masked
    new_query, new_key, new_value, new_mask, new = _case(4, 4, 1, seed=1)

    def with_room(t):  # (3, heads, 6, dim) -> (4, heads, 12, dim), this batch's passages in front
        out = t.new_zeros(4, t.size(1), 12, t.size(3))
        out[:3, :, 6:] = t
        return out

    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[:3, 6:] = new.mask
    wide = SharedPrefix([with_room(new.keys[0])], [with_room(new.values[0])], mask, new.row_group)
    wide.take_in(carried)
    assert wide.row_group.tolist() == new.row_group.tolist() + [3, 3] and wide.mask[3].sum() == 6
    both, _ = shared_prefix_attention(Layer(), torch.cat([new_query, query[rows]]), torch.cat([new_key, key[rows]]),
                                      torch.cat([new_value, value[rows]]), torch.cat([new_mask, own_mask[rows]]),
                                      shared_prefix=wide)
    alone, _ = shared_prefix_attention(Layer(), new_query, new_key, new_value, new_mask, shared_prefix=new)
    torch.testing.assert_close(both[7:], before[rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[:7], alone, rtol=1e-5, atol=1e-6)


def test_a_passage_prefill_shares_key_value_heads_to_the_bit(tiny_llama_dir):
    """Without a shared prefix (a passage's own prefill), a grouped-query model attends with its
    key/value heads shared instead of transformers' copies (repeat_kv): the same logits to the
    bit, in float32 on a CPU; the model's attention setting is restored after."""
    from transformers import StaticCache
    from transformers.integrations import sdpa_attention

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

    copies, repeat_kv = [], sdpa_attention.repeat_kv
    sdpa_attention.repeat_kv = lambda *a: copies.append(1) or repeat_kv(*a)
    try:
        copied = logits()
        made = len(copies)
        with prefix_attention(model):
            shared = logits()
    finally:
        sdpa_attention.repeat_kv = repeat_kv
    assert model.config._attn_implementation == "sdpa"
    assert made > 0 and len(copies) == made  # copied without, shared with
    assert torch.equal(copied, shared)
