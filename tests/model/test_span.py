"""--method span: windows and labels, the loss, the head trained in full, and the CLI end to end."""

import json

import torch

from loraqa.cli import main
from loraqa.data.examples import Example
from loraqa.model.span import build_span_features, collate_span, predict_spans, span_loss_sum

CPU = torch.device("cpu")
CONTEXT = ("The mill on the river was built in 1820 by the Weber family. It burned in 1851 and was rebuilt "
           "by the Müller family in 1853. Today it is a museum about milling and the river trade.")


def _example(answer: str, qid: str = "m1") -> Example:
    return Example(qid, "Mill", CONTEXT, "Who rebuilt the mill?", (answer,), (CONTEXT.index(answer),))


def test_labels_point_at_the_answer_tokens(tokenizer):
    features, stats = build_span_features(tokenizer, [_example("the Müller family")], max_length=512)
    [f] = features
    assert stats.windowed == 0 and f.start >= f.first and f.end >= f.start
    assert tokenizer.decode(f.input_ids[f.start:f.end + 1]).strip() == "the Müller family"
    lo, hi = f.offsets[f.start - f.first][0], f.offsets[f.end - f.first][1]
    assert CONTEXT[lo:hi].strip() == "the Müller family"


def test_long_contexts_are_read_in_overlapping_windows(tokenizer):
    features, stats = build_span_features(tokenizer, [_example("a museum")], max_length=40, doc_stride=8)
    assert stats.windowed == 1 and len(features) > 2
    seen = [o for f in features for o in f.offsets]
    assert {o for o in seen} == {o for f in features for o in f.offsets}
    assert features[0].offsets[0][0] == 0 and features[-1].offsets[-1][1] == len(CONTEXT)  # all of it is read
    for a, b in zip(features, features[1:]):
        assert len(set(a.offsets) & set(b.offsets)) == 8  # doc_stride tokens shared
    holding = [f for f in features if f.start]
    assert holding and all(len(f.input_ids) <= 40 for f in features)
    assert all((f.start, f.end) == (0, 0) for f in features if f not in holding)  # "not here" windows
    unanswerable = Example("u", "Mill", CONTEXT, "Who?", (), ())
    assert all((f.start, f.end) == (0, 0) for f in build_span_features(tokenizer, [unanswerable], 40, 8)[0])


def test_span_loss_equals_the_model_loss_times_windows(tiny_model_dir, tokenizer):
    from loraqa.model.load import load_model

    model = load_model(str(tiny_model_dir), span_head=True)
    features, _ = build_span_features(tokenizer, [_example("the Müller family"), _example("1820", "m2")], 512)
    batch = collate_span(features, tokenizer.pad_token_id)
    assert batch["attention_mask"].all()  # same length: no padding, where transformers' loss is ours
    theirs = model(**batch).loss
    torch.testing.assert_close(span_loss_sum(model, batch), theirs * len(features))


def test_lora_span_trains_the_head_in_full(tiny_model_dir):
    from loraqa.model.lora import add_lora
    from loraqa.model.load import load_model

    model = add_lora(load_model(str(tiny_model_dir), span_head=True), r=2, target_modules=["all-linear"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in trainable if "qa_outputs" in n}
    assert head and all("lora_" in n for n in trainable - head)
    assert not any("qa_outputs" in n and "lora_" in n for n in trainable)  # the head is not LoRA'd
    assert sum(p.numel() for n, p in model.named_parameters() if n in head) == 32 * 2 + 2


def test_predictions_are_spans_of_the_context(tiny_model_dir, tokenizer):
    from loraqa.model.load import load_model

    model = load_model(str(tiny_model_dir), span_head=True)
    examples = [_example("the Müller family"), _example("1820", "m2")]
    features, _ = build_span_features(tokenizer, examples, 40, 8)
    probs: dict[str, float] = {}
    answers = predict_spans(model, tokenizer, examples, features, 3, CPU, allow_no_answer=False, max_answer_tokens=5,
                            na_probs=probs)
    assert set(answers) == {"m1", "m2"} and all(a and a in CONTEXT for a in answers.values())
    assert all(0 <= p <= 1 for p in probs.values())


def test_train_evaluate_ask_merge_end_to_end(tiny_model_dir, tmp_path, capsys):
    from conftest import SQUAD

    run = tmp_path / "run"
    common = ["--model", str(tiny_model_dir), "--precision", "fp32", "--quiet"]
    assert main(["train", *common, "--method", "span", "--train-file", str(SQUAD), "--eval-file", str(SQUAD),
                 "--epochs", "3", "--lr", "1e-2", "--r", "4", "--max-length", "96", "--doc-stride", "16",
                 "--output-dir", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    predictions = json.loads((run / "predictions.json").read_text())
    assert metrics["method"] == "span" and metrics["n_questions"] == 6 and metrics["train_windowed"] > 0
    assert metrics["analysis"]["not_in_context_share"] == 0.0
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["task_type"] == "QUESTION_ANS" and "qa_outputs" in saved["modules_to_save"]
    # evaluate with the adapter reads the method from its settings, and answers the same
    assert main(["evaluate", *common[:-1], "--adapter", str(run / "adapter"), "--eval-file", str(SQUAD),
                 "--output-dir", str(tmp_path / "again"), "--quiet"]) == 0
    assert json.loads((tmp_path / "again" / "predictions.json").read_text()) == predictions
    from loraqa.data.squad import load_squad_file
    q = load_squad_file(SQUAD)[3]
    assert main(["ask", *common[:-1], "--adapter", str(run / "adapter"), "--context", q.context,
                 "--question", q.question]) == 0
    assert capsys.readouterr().out.strip() == predictions[q.id]
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(run / "adapter"),
                 "--output-dir", str(tmp_path / "merged")]) == 0
    assert main(["evaluate", "--model", str(tmp_path / "merged"), "--method", "span", "--max-length", "96",
                 "--doc-stride", "16", "--eval-file", str(SQUAD), "--precision", "fp32",
                 "--output-dir", str(tmp_path / "merged-eval"), "--quiet"]) == 0
    assert json.loads((tmp_path / "merged-eval" / "predictions.json").read_text()) == predictions


def test_serve_refuses_a_span_model(tiny_model_dir, capsys):
    assert main(["serve", "--model", str(tiny_model_dir), "--method", "span"]) == 2
    assert "loraqa ask" in capsys.readouterr().err
