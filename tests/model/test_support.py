import pytest
import torch
from conftest import build_tokenizer
from families import FAMILIES

from loraqa.model.support import NO_WINDOW, DecodingSupport, decoding_support, rope_scaling, windows_lifted

FAMILY = {f.id: f for f in FAMILIES}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("family", FAMILIES, ids=[f.id for f in FAMILIES])
def test_each_family_gets_the_path_window_and_longest_question_its_table_row_names(family, tokenizer):
    support = decoding_support(family.build(tokenizer))
    assert (support.path, support.window, support.longest) == (family.path, family.window, family.longest), support.why


def test_a_layer_that_keeps_a_cache_of_its_own_goes_to_generate(tokenizer):
    model = FAMILY["llama"].build(tokenizer)
    model.config.layer_types = ["full_attention", "linear_attention"]
    support = decoding_support(model)
    assert support.path == "generate" and "linear_attention" in support.why


def test_attention_in_another_mode_goes_to_generate(tokenizer):
    model = FAMILY["llama"].build(tokenizer)
    model.config._attn_implementation = "flex_attention"
    assert decoding_support(model).path == "generate"


def test_fits_counts_prompt_and_answer_against_the_smallest_window_or_the_ropes_limit():
    support = DecodingSupport("shared", "test", window=100)
    assert support.fits(100) and not support.fits(101)
    assert support.too_long() == "longer than the model's 100-token window"
    assert DecodingSupport("shared", "test").fits(10**6)
    rope = DecodingSupport("shared", "test", window=100, rope=("longrope", 50))
    assert rope.fits(50) and not rope.fits(51) and "50 tokens" in rope.too_long() and "longrope" in rope.too_long()


def test_fallback_goes_one_path_slower_and_keeps_the_limits():
    copies = DecodingSupport("shared", "test", window=64, rope=("dynamic", 80)).fallback("it differs")
    assert (copies.path, copies.why, copies.window, copies.rope) == ("copies", "it differs", 64, ("dynamic", 80))
    assert copies.fallback("again").path == "generate"


def test_rope_scaling_per_layer_type_takes_the_smallest_limit(tokenizer):
    model = FAMILY["llama"].build(tokenizer)
    assert rope_scaling(model) is None  # plain rope: no limit
    model.config.rope_parameters = {
        "full_attention": {"rope_type": "default"},
        "sliding_attention": {"rope_type": "longrope", "original_max_position_embeddings": 64}}
    assert rope_scaling(model) == ("longrope", 64)


def test_windows_are_lifted_inside_the_block_only(tokenizer):
    model = FAMILY["gemma3-text"].build(tokenizer)
    window = model.config.sliding_window
    with windows_lifted(model):
        assert model.config.sliding_window == NO_WINDOW
    assert model.config.sliding_window == window
    with pytest.raises(RuntimeError), windows_lifted(model):
        raise RuntimeError("the block fails")
    assert model.config.sliding_window == window  # put back whatever happens


@pytest.mark.parametrize("family", ["gemma3-text", "gpt-neo"])
def test_lifted_windows_give_the_causal_mask_for_a_question_that_fits(family, tokenizer):
    """What lifting relies on: for a sequence no longer than the window, the sliding (GPT-Neo: local)
    layers' mask is the plain causal one, so lifting changes nothing the model computes; past it,
    lifting does change it (the window was lifted)."""
    model, window = FAMILY[family].build(tokenizer), FAMILY[family].window
    ids = torch.arange(1, window + 20)[None] % len(tokenizer)
    with torch.no_grad():
        plain = model(ids).logits
        with windows_lifted(model):
            lifted = model(ids).logits
        again = model(ids).logits
    torch.testing.assert_close(lifted[:, :window], plain[:, :window], rtol=0, atol=0)
    assert (lifted[:, window:] - plain[:, window:]).abs().max() > 1e-3
    torch.testing.assert_close(again, plain, rtol=0, atol=0)  # the windows put back


def test_longrope_moves_a_short_row_once_its_batch_holds_a_longer_one(tokenizer):
    """What the rope's limit guards: transformers picks LongRoPE's factors by the longest position
    of the whole forward, so a short row's logits change beside a row past the limit, and not
    beside one below it."""
    model, limit = FAMILY["phi3-longrope"].build(tokenizer), FAMILY["phi3-longrope"].rope_limit
    short = torch.arange(1, 40) % len(tokenizer)

    def beside(n):  # the short row's last logits, left-padded beside a row of n tokens
        ids = torch.zeros(2, n, dtype=torch.long)
        mask = torch.zeros(2, n, dtype=torch.long)
        ids[0, -len(short):], mask[0, -len(short):] = short, 1
        ids[1], mask[1] = torch.arange(n) % len(tokenizer), 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            return model(ids, attention_mask=mask, position_ids=positions).logits[0, -1]

    with torch.no_grad():
        alone = model(short[None]).logits[0, -1]
    torch.testing.assert_close(beside(limit), alone, rtol=1e-5, atol=1e-5)
    assert (beside(limit + 1) - alone).abs().max() > 1e-2
