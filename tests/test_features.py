import pytest

from loraqa import IGNORE_INDEX
from loraqa.config import DEFAULT_TEMPLATE
from loraqa.features import (Feature, build_eval_features, build_train_features, collate_shared_prefix,
                             collate_train, length_grouped_batches, shared_prefix_batches, target_ids)


def test_label_mask_keeps_answer_and_eos_even_though_pad_is_eos(tokenizer, examples):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the GPT-2 situation
    features, stats = build_train_features(tokenizer, examples[:3], DEFAULT_TEMPLATE, 512)
    assert stats.as_dict() == {"examples": 3, "windowed": 0, "dropped": 0}
    batch = collate_train(features, tokenizer.pad_token_id)
    for i, f in enumerate(features):
        n, p = len(f.input_ids), f.n_prompt
        labels = batch["labels"][i].tolist()
        assert labels[:p] == [IGNORE_INDEX] * p                                  # prompt masked
        assert labels[p:n] == f.input_ids[p:]                                    # answer + EOS kept
        assert labels[n - 1] == tokenizer.eos_token_id                           # ... including EOS
        assert labels[n:] == [IGNORE_INDEX] * (batch["labels"].shape[1] - n)     # padding masked
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["labels"].shape[1] - n)
    assert min(len(f.input_ids) for f in features) < batch["input_ids"].shape[1]  # padding was exercised


def test_target_is_space_answer_eos(tokenizer, examples):
    f = build_train_features(tokenizer, examples[:1], DEFAULT_TEMPLATE, 512)[0][0]
    assert f.input_ids[f.n_prompt:] == target_ids(tokenizer, "Denver Broncos")
    assert tokenizer.decode(f.input_ids[:f.n_prompt]).endswith("\nAnswer:")
    assert tokenizer.decode(f.input_ids[f.n_prompt:-1]) == " Denver Broncos"


def test_long_context_is_windowed_around_the_answer_in_training(tokenizer, examples):
    mill = [e for e in examples if e.id == "q4"]
    full = build_train_features(tokenizer, mill, DEFAULT_TEMPLATE, 2048)[0][0]
    features, stats = build_train_features(tokenizer, mill, DEFAULT_TEMPLATE, 96)
    f = features[0]
    assert stats.windowed == 1 and len(f.input_ids) <= 96 < len(full.input_ids)
    text = tokenizer.decode(f.input_ids)
    assert "Müller family" in text and text.endswith("Question: Who rebuilt the old mill?\nAnswer: the Müller family<|endoftext|>")
    assert f.input_ids[f.n_prompt:] == full.input_ids[full.n_prompt:]  # the answer is never cut


def test_eval_keeps_question_and_cue_and_room_to_generate(tokenizer, examples):
    features, stats = build_eval_features(tokenizer, examples, DEFAULT_TEMPLATE, 96, max_new_tokens=16)
    assert stats.windowed >= 1 and stats.dropped == 0 and len(features) == len(examples)
    for f in features:
        assert f.n_prompt == len(f.input_ids) <= 96 - 16
        assert tokenizer.decode(f.input_ids).endswith("?\nAnswer:")


def test_examples_that_cannot_fit_are_dropped_and_counted(tokenizer, examples):
    features, stats = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, 12)
    assert stats.dropped == len(examples) - len(features) > 0
    assert set(stats.dropped_ids) == {e.id for e in examples} - {f.id for f in features}


def test_prompts_sharing_a_passage_are_grouped_and_split_into_prefix_and_rest():
    passage = list(range(100, 120))  # 20 shared tokens (>= MIN_SHARED_PREFIX)
    a, b = Feature("a", passage + [1, 2], 22), Feature("b", passage + [3], 21)
    c = Feature("c", [7, 8, 9], 3)
    batches = shared_prefix_batches([c, a, b], batch_size=8)
    assert [[[f.id for f in g] for g in batch] for batch in batches] == [[["a", "b"], ["c"]]]
    t = collate_shared_prefix(batches[0], pad_id=0)
    assert t["prefix_ids"].tolist() == [passage, [0] * 18 + [7, 8]]   # left-padded; c keeps 1 token back
    assert t["prefix_mask"].tolist() == [[1] * 20, [0] * 18 + [1, 1]]
    assert t["row_prefix"].tolist() == [0, 0, 1]
    assert t["input_ids"].tolist() == [[1, 2], [0, 3], [0, 9]]          # remainders, left-padded
    assert t["attention_mask"].tolist() == [[1, 1], [0, 1], [0, 1]]
    assert [len(b) for b in shared_prefix_batches([c, a, b], batch_size=2)] == [1, 1]  # groups stay whole


def test_decoding_batches_shrink_for_long_prompts():
    short = [Feature(f"s{i}", [i], 1) for i in range(8)]
    long = [Feature(f"l{i}", [50 + i] * 30, 30) for i in range(4)]
    batches = shared_prefix_batches(short + long, batch_size=8, max_tokens=80, new_tokens=10)
    sizes = [sum(len(g) for g in b) for b in batches]
    assert sizes == [2, 2, 7, 1]  # 2 x (30 + 10) fits 80; 7 x (1 + 10) = 77 fits, 8 would not
    assert sorted(f.id for b in batches for g in b for f in g) == sorted(f.id for f in short + long)


@pytest.mark.parametrize("n, batch_size", [(10, 3), (100, 4), (7, 8)])
def test_length_grouped_batches_cover_every_index_once(n, batch_size):
    lengths = [(i * 37) % 23 for i in range(n)]
    batches = length_grouped_batches(lengths, batch_size, seed=1, group_batches=2)
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert all(len(b) <= batch_size for b in batches)
    assert batches == length_grouped_batches(lengths, batch_size, seed=1, group_batches=2)
    if n > 2 * batch_size:
        assert batches != length_grouped_batches(lengths, batch_size, seed=2, group_batches=2)
