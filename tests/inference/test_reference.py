"""The reference path (transformers' generate, one question at a time) applies loraqa's token rules
as the batched decoder does: the same tokens, the same watched probabilities, greedy whatever the
model's own generation config says."""

import pytest
import torch

from loraqa.config import DEFAULT_TEMPLATE
from loraqa.data.batching import collate_shared_prefix, split_groups
from loraqa.data.features import build_eval_features
from loraqa.inference.constrain import ContextConstraint
from loraqa.inference.decoder import Batch, decode
from loraqa.inference.generate import stop_token_ids
from loraqa.inference.reference import generate_each


def _both(model, tokenizer, examples, **options):
    features, _ = build_eval_features(tokenizer, examples, DEFAULT_TEMPLATE, 512, 8)
    t = collate_shared_prefix(split_groups(features), tokenizer.pad_token_id)
    batch = Batch(t["input_ids"], t["attention_mask"], list(range(len(features))),
                  (t["prefix_ids"], t["prefix_mask"], t["row_prefix"]))
    stops = torch.tensor(stop_token_ids(tokenizer))
    with torch.inference_mode():
        batched = {tag: (tokens, p) for tag, tokens, p in decode(model, [batch], 8, stops, **options)}
    alone = {tag: (tokens, p) for tag, tokens, p in
             generate_each(model, enumerate(f.input_ids for f in features), 8, stops, **options)}
    return batched, alone


@pytest.mark.parametrize("rules", ["none", "held to the passage", "no-answer threshold"])
def test_generate_each_follows_the_decoders_rules(tiny_model, tokenizer, examples, rules):
    options, abstain = {}, None
    if rules == "held to the passage":
        options["choose"] = ContextConstraint(tokenizer, [ex.context for ex in examples])
    if rules == "no-answer threshold":  # between the rows' p(EOS): half of them above it
        eos = tokenizer.eos_token_id
        watched, _ = _both(tiny_model.eval(), tokenizer, examples, watch_id=eos)
        probs = sorted(p for _, p in watched.values())
        options.update(watch_id=eos, na_thresh=(probs[len(probs) // 2 - 1] + probs[len(probs) // 2]) / 2)
        abstain = {t for t, (_, p) in watched.items() if p > options["na_thresh"]}
    batched, alone = _both(tiny_model.eval(), tokenizer, examples, **options)
    assert [alone[t][0] for t in sorted(alone)] == [batched[t][0] for t in sorted(batched)]
    if abstain is not None:  # EOS first exactly above the threshold, though it is never the argmax here
        assert 0 < len(abstain) < len(batched)
        assert {t for t, (tokens, _) in batched.items() if tokens[0] == eos} == abstain
    for t in batched:
        assert (alone[t][1] is None) == (batched[t][1] is None)
        if batched[t][1] is not None:
            assert alone[t][1] == pytest.approx(batched[t][1], rel=1e-5)


def test_generate_each_is_greedy_whatever_the_models_generation_config(tiny_model, tokenizer, examples):
    model = tiny_model.eval()
    plain, _ = _both(model, tokenizer, examples)
    model.generation_config.do_sample, model.generation_config.repetition_penalty = True, 5.0
    model.generation_config.temperature = 3.0
    _, alone = _both(model, tokenizer, examples)
    assert [alone[t][0] for t in sorted(alone)] == [plain[t][0] for t in sorted(plain)]
    assert model.generation_config.repetition_penalty == 5.0  # the model's own config put back
