import pytest
import torch
from conftest import build_tokenizer
from families import FAMILIES

from loraqa.model.support import NO_WINDOW, DecodingSupport, decoding_support, windows_lifted

FAMILY = {f.id: f for f in FAMILIES}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("family", FAMILIES, ids=[f.id for f in FAMILIES])
def test_each_family_gets_the_path_and_window_its_table_row_names(family, tokenizer):
    support = decoding_support(family.build(tokenizer))
    assert (support.path, support.window) == (family.path, family.window), support.why


def test_a_layer_that_keeps_a_cache_of_its_own_goes_to_generate(tokenizer):
    model = FAMILY["llama"].build(tokenizer)
    model.config.layer_types = ["full_attention", "linear_attention"]
    support = decoding_support(model)
    assert support.path == "generate" and "linear_attention" in support.why


def test_attention_in_another_mode_goes_to_generate(tokenizer):
    model = FAMILY["llama"].build(tokenizer)
    model.config._attn_implementation = "flex_attention"
    assert decoding_support(model).path == "generate"


def test_fits_counts_prompt_and_answer_against_the_smallest_window():
    support = DecodingSupport("shared", "test", window=100)
    assert support.fits(100) and not support.fits(101)
    assert DecodingSupport("shared", "test").fits(10**6)


def test_fallback_goes_one_path_slower_and_keeps_the_window():
    copies = DecodingSupport("shared", "test", window=64).fallback("it differs")
    assert (copies.path, copies.why, copies.window) == ("copies", "it differs", 64)
    assert copies.fallback("again").path == "generate"


def test_windows_are_lifted_inside_the_block_only(tokenizer):
    model = FAMILY["gemma3-text"].build(tokenizer)
    window = model.config.sliding_window
    with windows_lifted(model):
        assert model.config.sliding_window == NO_WINDOW
    assert model.config.sliding_window == window
    with pytest.raises(RuntimeError), windows_lifted(model):
        raise RuntimeError("the block fails")
    assert model.config.sliding_window == window  # put back whatever happens


def test_lifted_windows_give_the_causal_mask_for_a_question_that_fits(tokenizer):
    """What lifting relies on: for a sequence no longer than the window, the sliding layers' mask
    is the plain causal one, so lifting changes nothing the model computes."""
    model = FAMILY["gemma3-text"].build(tokenizer)
    ids = torch.arange(1, model.config.sliding_window)[None] % len(tokenizer)
    with torch.no_grad():
        plain = model(ids).logits
        with windows_lifted(model):
            lifted = model(ids).logits
    torch.testing.assert_close(lifted, plain, rtol=0, atol=0)
