import pytest
import torch

from loraqa.config import DEFAULT_TEMPLATE
from loraqa.data.features import build_eval_features
from loraqa.inference.decoder import greedy_generate
from loraqa.inference.generate import answer_text, predict, stop_token_ids
from loraqa.inference.settings import DecodeSettings
from loraqa.model.prefix import KVPool

CPU = torch.device("cpu")


@pytest.mark.parametrize("batch_size", [2, 6])  # 2: several batches of different shapes share one KVPool
def test_batched_generation_equals_one_at_a_time(tiny_model, tokenizer, examples, batch_size):
    features, _ = build_eval_features(tokenizer, examples, DEFAULT_TEMPLATE, 512, 12)
    assert len({f.n_prompt for f in features}) > 1  # different lengths: left padding is exercised
    batched = predict(tiny_model, tokenizer, features, DecodeSettings(512, batch_size=batch_size, max_new_tokens=12), CPU,
                      progress=False)
    alone = {}
    for f in features:
        alone.update(predict(tiny_model, tokenizer, [f], DecodeSettings(512, batch_size=1, max_new_tokens=12), CPU,
                             progress=False))
    assert batched == alone and set(batched) == {e.id for e in examples}


def test_generation_matches_transformers_greedy(tiny_model, tokenizer, examples):
    features, _ = build_eval_features(tokenizer, examples[:1], DEFAULT_TEMPLATE, 512, 10)
    ids = torch.tensor([features[0].input_ids])
    mask = torch.ones_like(ids)
    ours, _ = greedy_generate(tiny_model.eval(), ids, mask, 10, torch.tensor([-1]), tokenizer.pad_token_id)
    theirs = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
    assert ours[0].tolist() == theirs[0, ids.shape[1]:].tolist()


def test_kv_pool_reuses_its_memory_and_regrows_when_needed():
    pool, like = KVPool(), torch.zeros(1, 2, 5, 4)
    big = pool.view(0, "keys", like, rows=3)
    small = pool.view(0, "keys", like, rows=2)
    assert big.shape == (3, 2, 5, 4) and small.shape == (2, 2, 5, 4) and small.is_contiguous()
    assert small.data_ptr() == big.data_ptr()  # the same memory, no new allocation
    assert pool.view(1, "keys", like, rows=2).data_ptr() != small.data_ptr()  # each layer its own
    assert pool.view(0, "keys", like, rows=2, side=1).data_ptr() != small.data_ptr()  # and each side
    assert pool.view(0, "keys", like, rows=4).shape == (4, 2, 5, 4)  # bigger: a new buffer
    assert pool.view(0, "keys", like.double(), rows=1).dtype == torch.float64


def test_rows_stop_at_eos_or_newline(tokenizer):
    stops = stop_token_ids(tokenizer)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    assert tokenizer.eos_token_id in stops and newline in stops
    word = tokenizer(" Denver", add_special_tokens=False)["input_ids"]
    assert answer_text(tokenizer, word + [newline]) == answer_text(tokenizer, word + [tokenizer.eos_token_id]) == "Denver"


def test_rows_that_stop_leave_the_batch_and_the_others_decode_as_before(tiny_model, tokenizer, examples):
    """Stop tokens picked so rows stop at different steps: the rows still going after others
    have left (their cache compacted away) produce exactly the tokens they produce with no stops."""
    features, _ = build_eval_features(tokenizer, examples, DEFAULT_TEMPLATE, 512, 8)
    settings = DecodeSettings(512, batch_size=len(features), max_new_tokens=8)
    never = torch.tensor([-1])
    from loraqa.data.batching import collate_shared_prefix, shared_prefix_batches

    (groups,) = shared_prefix_batches(features, settings.batch_size)
    t = collate_shared_prefix(groups, tokenizer.pad_token_id)
    prefix = (t["prefix_ids"], t["prefix_mask"], t["row_prefix"])
    full, _ = greedy_generate(tiny_model.eval(), t["input_ids"], t["attention_mask"], 8, never, -100, prefix=prefix)
    assert full.shape == (len(features), 8)
    stops = torch.tensor(sorted({full[0, 1].item(), full[-1, 4].item()}))  # row 0 stops by step 2, the last by 5
    ended, _ = greedy_generate(tiny_model.eval(), t["input_ids"], t["attention_mask"], 8, stops, -100, prefix=prefix)
    lengths = []
    for row, expect in zip(ended.tolist(), full.tolist()):
        n = next((i + 1 for i, tok in enumerate(expect) if tok in stops.tolist()), 8)
        assert row[:n] == expect[:n] and all(tok == -100 for tok in row[n:])
        lengths.append(n)
    assert min(lengths) <= 2 and max(lengths) > min(lengths)  # rows did stop at different steps


def test_prefill_runs_split_where_padding_costs_more_than_a_call():
    from loraqa.model.prefix import width_runs

    assert width_runs([30, 29, 28, 10, 9], run_cost=5) == [(0, 3), (3, 5)]  # one call for 30 + 10 padded = worse
    assert width_runs([30, 29, 28, 10, 9], run_cost=1000) == [(0, 5)]  # calls dear: pad everything
    assert width_runs([7], run_cost=5) == [(0, 1)] and width_runs([]) == []
