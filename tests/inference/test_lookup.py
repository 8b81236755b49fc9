import pytest

from loraqa.inference.constrain import ContextConstraint
from loraqa.inference.lookup import PromptLookup, follows
from tests.inference.test_decoder import _run, _two_batches


def test_follows_finds_the_first_occurrence_with_something_after_it():
    assert follows([5, 1, 2, 1, 2, 3], [1, 2]) == 3
    assert follows([5, 1, 9, 1, 2, 3], [1, 2]) == 5   # the first 1 is not followed by 2
    assert follows([5, 1, 2], [1, 2]) is None          # nothing after it to guess
    assert follows([5, 1, 2], [7]) is None


def test_a_guess_kept_whole_is_followed_by_a_longer_one():
    prompt = list(range(100, 140))
    lookup = PromptLookup([prompt], most=4)
    assert lookup(0, [100], 30) == [101, 102, 103, 104]                   # a first guess: 4
    assert lookup(0, [100, 101, 102, 103, 104, 105], 30) == prompt[6:36]  # kept whole (105 chosen after it): 30
    assert lookup(0, prompt[:36] + [7], 30) == []                          # not found
    assert lookup(0, [100, 101], 30) == [102, 103, 104, 105]              # the last guess was not kept: 4 again


def test_a_longer_tail_is_a_surer_guess():
    prompt = [1, 2, 9, 9, 3, 2, 4, 5, 6]
    lookup = PromptLookup([prompt], most=8)
    assert lookup(0, [3, 2], 8) == [4, 5, 6]          # "3 2" found: not the first "2"
    assert lookup(0, [7, 2], 2) == [9, 9]             # only "2" found: its first place, at most 2
    assert lookup(0, [7, 8], 8) == []


class Guess:
    """A drafter that knows each row's answer (``truth``), wrong from its ``wrong``-th token of
    each guess on: every guess is partly kept, partly thrown away."""

    def __init__(self, truth, wrong, most=8):
        self.truth, self.wrong, self.most, self.guessed = truth, wrong, most, 0

    def __call__(self, tag, made, most):
        guess = list(self.truth[tag][len(made):len(made) + most])
        if self.wrong < len(guess):
            guess[self.wrong] = (guess[self.wrong] + 1) % 50
        self.guessed += len(guess)
        return guess


@pytest.mark.parametrize("arch,path", [("gpt2", "copies"), ("llama", "shared"), ("llama", "copies")])
@pytest.mark.parametrize("wrong", [0, 2, 8])
def test_guessed_tokens_decode_as_one_step_at_a_time(arch, path, wrong, tiny_model_dir, tiny_llama_dir, tokenizer,
                                                     examples):
    """Rows that take a guess's tokens (all, some or none of them; rows ending at different steps,
    carried into the next batch) produce exactly the tokens of one step at a time, in fewer
    forwards when the guesses are right."""
    from loraqa.model.load import load_model

    model = load_model(str(tiny_llama_dir if arch == "llama" else tiny_model_dir)).eval()
    batches, n = _two_batches(tokenizer, examples)
    full, _ = _run(model, batches, [-1], path=path)
    stops = sorted({full[t][1] for t in range(n)} - set(full[0]))  # rows end at different steps, row 0 runs on
    plain, plain_calls = _run(model, batches, stops, path=path)
    guess = Guess(full, wrong)
    drafted, drafted_calls = _run(model, batches, stops, path=path, draft=guess)
    assert guess.guessed and drafted == plain and set(drafted) == set(range(2 * n))
    assert len({len(t) for t in drafted.values()}) > 1
    if wrong:
        assert drafted_calls < plain_calls


def test_guesses_are_chosen_by_the_constraint_too(tiny_model, tokenizer, examples):
    """With ``choose`` (answers held to the passage), each guessed token is checked by its choice."""
    batches, n = _two_batches(tokenizer, examples)
    rule = ContextConstraint(tokenizer, [ex.context for ex in examples] * 2)
    model = tiny_model.eval()
    plain, _ = _run(model, batches, [-1], choose=rule)
    drafted, _ = _run(model, batches, [-1], choose=rule, draft=Guess(plain, 3))
    assert drafted == plain


def test_a_guessed_row_whose_listener_is_gone_ends_at_that_token(tiny_model, tokenizer, examples):
    """``on_token`` hears a kept guess token by token: a row whose client left ends at that token."""
    batches, n = _two_batches(tokenizer, examples)
    model = tiny_model.eval()
    full, _ = _run(model, batches[:1], [-1])
    heard = []

    def on_token(tag, token):
        heard.append(tag)
        return tag == 0 and heard.count(0) == 3

    out, _ = _run(model, batches[:1], [-1], draft=Guess(full, 8), on_token=on_token)
    assert out[0] == full[0][:3] and heard.count(0) == 3
    assert all(out[t] == full[t] for t in range(1, n))


def test_a_batch_too_large_to_check_guesses_keeps_no_room_for_them(tiny_model, tokenizer, examples, monkeypatch):
    """Guesses are checked in steps of few rows, and their holes take cache columns: a batch of many
    rows keeps the cache its budget counts (no columns for guesses), a batch of few gets them."""
    from dataclasses import replace

    from loraqa.config import DEFAULT_TEMPLATE
    from loraqa.data.features import build_eval_features
    from loraqa.inference import decoder
    from loraqa.inference.drafting import DRAFT_TOKENS
    from tests.inference.test_decoder import _batch

    lengths, make = [], decoder.static_cache
    monkeypatch.setattr(decoder, "static_cache", lambda lm, n: lengths.append(n) or make(lm, n))
    many = [replace(ex, id=f"{ex.id}-{i}") for i in range(DRAFT_TOKENS // 2 // len(examples) + 1) for ex in examples]
    features, _ = build_eval_features(tokenizer, many, DEFAULT_TEMPLATE, 512, 8)
    assert 2 * len(features) > DRAFT_TOKENS
    model = tiny_model.eval()
    for batch, more in (([_batch(features, tokenizer.pad_token_id, list(range(len(features))))], False),
                        (_two_batches(tokenizer, examples)[0][:1], True)):
        lengths.clear()
        plain, _ = _run(model, batch, [-1])
        guess = Guess(plain, 8)
        drafted, _ = _run(model, batch, [-1], draft=guess)
        assert drafted == plain and (lengths[1] > lengths[0]) == more and bool(guess.guessed) == more
