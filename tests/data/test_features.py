
from loraqa import IGNORE_INDEX
from loraqa.config import DEFAULT_TEMPLATE
from loraqa.data.features import build_eval_features, build_train_features, collate_train, target_ids


def test_label_mask_keeps_answer_and_eos_even_though_pad_is_eos(tokenizer, examples):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the GPT-2 situation
    features, stats = build_train_features(tokenizer, examples[:3], DEFAULT_TEMPLATE, 512)
    assert (stats.examples, stats.windowed, stats.dropped) == (3, 0, 0)
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
