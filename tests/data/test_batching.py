import pytest

from loraqa.data.batching import collate_context_train, collate_shared_prefix, context_batches, context_groups, length_grouped_batches, shared_prefix_batches
from loraqa.data.features import collate_train, Feature

PASSAGE = list(range(100, 120))  # 20 shared tokens (>= MIN_SHARED_PREFIX)


def test_prompts_sharing_a_PASSAGE_are_grouped_and_split_into_prefix_and_rest():
    a, b = Feature("a", PASSAGE + [1, 2], 22), Feature("b", PASSAGE + [3], 21)
    c = Feature("c", [7, 8, 9], 3)
    batches = shared_prefix_batches([c, a, b], batch_size=8)
    assert [[[f.id for f in g] for g in batch] for batch in batches] == [[["a", "b"], ["c"]]]
    t = collate_shared_prefix(batches[0], pad_id=0)
    assert t["prefix_ids"].tolist() == [PASSAGE, [0] * 18 + [7, 8]]   # left-padded; c keeps 1 token back
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
    assert sizes == [1, 7, 2, 2]  # 2 x (30 + 10) fits 80; 7 x (1 + 10) = 77 fits, 8 would not; shortest first
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


def _passages(n_passages: int, per: int) -> list[Feature]:
    """Features on ``n_passages`` passages, ``per`` questions each, with a 2-token answer."""
    return [Feature(f"p{p}q{q}", [p + 1] * 20 + [50 + q] * (1 + q) + [9, 9], 21 + q)
            for p in range(n_passages) for q in range(per)]


def test_context_batches_keep_passages_together_and_cover_every_question_once():
    features = _passages(5, 3)
    groups = context_groups(features)
    assert sorted(len(g) for g in groups) == [3] * 5
    batches = context_batches(groups, batch_size=3, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(15))
    assert all(len({features[i].input_ids[0] for i in b}) == 1 for b in batches)  # batch = one passage here
    assert batches == context_batches(groups, 3, seed=1) and batches != context_batches(groups, 3, seed=2)


def test_context_collate_equals_whole_examples_split_at_the_shared_prefix():
    features = _passages(2, 2) + [Feature("lone", [7] * 5 + [8, 8], 5)]
    t = collate_context_train(features, pad_id=0)
    whole = collate_train(features, pad_id=0)
    assert t["row_prefix"].tolist() == [0, 0, 1, 1, 2]
    for i, f in enumerate(features):
        prefix = t["prefix_ids"][t["row_prefix"][i]][t["prefix_mask"][t["row_prefix"][i]].bool()]
        rest = t["input_ids"][i][t["attention_mask"][i].bool()]
        assert prefix.tolist() + rest.tolist() == f.input_ids  # nothing lost, nothing added
        labelled = t["labels"][i][t["labels"][i] != -100].tolist()
        assert labelled == whole["labels"][i][whole["labels"][i] != -100].tolist() == f.input_ids[f.n_prompt:]
        assert len(rest) >= len(f.input_ids) - f.n_prompt + 1  # the last prompt token stays with its row
    assert t["attention_mask"][:, 0].all()  # remainders are right-padded
