"""Unanswerable questions: SQuAD v2.0 files, flat rows with --allow-unanswerable, the EOS target, scoring."""

import copy
import json
from dataclasses import replace

import pytest
import torch

from conftest import SQUAD
from loraqa import IGNORE_INDEX
from loraqa.cli import main
from loraqa.config import DEFAULT_TEMPLATE, Config
from loraqa.data.examples import DataError
from loraqa.data.load import load_examples, load_file
from loraqa.data.squad import parse_squad
from loraqa.data.features import build_eval_features, build_train_features, collate_train, no_answer_token, target_ids
from loraqa.inference.generate import predict
from loraqa.inference.settings import DecodeSettings

V1 = json.loads(SQUAD.read_text())


def _v2() -> dict:
    """The fixture as v2.0: q2 and q5 impossible (q2 with a plausible answer)."""
    data = copy.deepcopy(V1)
    data["version"] = "v2.0"
    for qa in (q for a in data["data"] for p in a["paragraphs"] for q in p["qas"]):
        qa["is_impossible"] = qa["id"] in ("q2", "q5")
        if qa["is_impossible"]:
            qa["plausible_answers"], qa["answers"] = qa["answers"], []
    return data


def _qa(data: dict, qid: str) -> dict:
    return next(q for a in data["data"] for p in a["paragraphs"] for q in p["qas"] if q["id"] == qid)


def test_v1_file_without_answers_is_still_an_error():
    data = copy.deepcopy(V1)
    _qa(data, "q1")["answers"] = []
    with pytest.raises(DataError, match="question q1: field 'answers' is empty .*--allow-unanswerable or a v2.0 file"):
        parse_squad(data, "v1.json")
    [q1] = [e for e in parse_squad(data, "v1.json", allow_unanswerable=True) if e.id == "q1"]
    assert q1.answers == () and not q1.answerable and q1.answer == ""


def test_v2_file_loads_with_answerable_flags(tmp_path):
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(_v2()))
    examples = load_examples(str(path), "validation")
    assert {e.id: e.answerable for e in examples} == {f"q{i}": i not in (2, 5) for i in range(1, 7)}
    q2 = next(e for e in examples if e.id == "q2")
    assert q2.answers == q2.answer_starts == () and q2.answer == ""  # plausible answers are never gold


@pytest.mark.parametrize("mutate, message", [
    (lambda d: _qa(d, "q2")["plausible_answers"][0].update(answer_start=1), "question q2, plausible_answers[0]: field"),
    (lambda d: _qa(d, "q1").update(is_impossible=True), "question q1: 'is_impossible' is true but"),
    (lambda d: _qa(d, "q1").update(is_impossible="no"), "question q1: field 'is_impossible' must be bool"),
])
def test_v2_records_are_checked(mutate, message):
    data = _v2()
    mutate(data)
    with pytest.raises(DataError) as err:
        parse_squad(data, "v2.json")
    assert message in str(err.value)


def test_flat_formats_need_allow_unanswerable(tmp_path):
    ctx = "The mill was rebuilt in 1820."
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"id": "x", "context": ctx, "question": "When?", "answers": {"text": ["1820"], "answer_start": [24]}},
        {"id": "y", "context": ctx, "question": "Who?", "answers": {"text": [], "answer_start": []}}]))
    with pytest.raises(DataError, match=r"line 2 \(id y\): field 'answers' is empty .*--allow-unanswerable"):
        load_file(jsonl, "train")
    assert [e.answerable for e in load_file(jsonl, "train", allow_unanswerable=True)] == [True, False]
    csv = tmp_path / "q.csv"
    csv.write_text(f"id,context,question,answer\nx,{ctx},When?,1820\ny,{ctx},Who?,\n")
    with pytest.raises(DataError, match="line 3 .*no answer"):
        load_file(csv, "train")
    examples = load_examples(str(csv), "train", allow_unanswerable=True)
    assert [(e.answers, e.answer_starts) for e in examples] == [(("1820",), (24,)), ((), ())]


def test_config_fields():
    c = Config()
    assert c.allow_unanswerable is False and c.no_answer_text == ""


def test_unanswerable_target_is_eos_right_after_the_prompt(tokenizer, tmp_path):
    examples = parse_squad(_v2(), "v2.json")
    assert target_ids(tokenizer, "") == [tokenizer.eos_token_id]
    features, stats = build_train_features(tokenizer, examples[:3], DEFAULT_TEMPLATE, 512)
    assert stats.dropped == 0
    q2 = features[1]
    assert q2.id == "q2" and q2.input_ids[q2.n_prompt:] == [tokenizer.eos_token_id]
    assert tokenizer.decode(q2.input_ids[:q2.n_prompt]).endswith("\nAnswer:")
    labels = collate_train([q2], tokenizer.pad_token_id)["labels"][0].tolist()
    assert labels == [IGNORE_INDEX] * q2.n_prompt + [tokenizer.eos_token_id]  # labels on EOS only
    # answerable examples are unchanged by the v2.0 file
    v1 = build_train_features(tokenizer, parse_squad(V1, "v1.json")[:1], DEFAULT_TEMPLATE, 512)[0]
    assert features[0] == v1[0]
    custom = build_train_features(tokenizer, examples[1:2], DEFAULT_TEMPLATE, 512, no_answer_text="unanswerable")[0][0]
    assert custom.input_ids[custom.n_prompt:] == target_ids(tokenizer, "unanswerable")


def test_unanswerable_long_context_is_cut_from_the_end(tokenizer):
    [q5] = [e for e in parse_squad(_v2(), "v2.json") if e.id == "q5"]
    full = build_train_features(tokenizer, [q5], DEFAULT_TEMPLATE, 2048)[0][0]
    features, stats = build_train_features(tokenizer, [q5], DEFAULT_TEMPLATE, 48)
    if len(full.input_ids) <= 48:
        pytest.skip("q5's context is short for this tokenizer")
    f = features[0]
    assert stats.windowed == 1 and len(f.input_ids) <= 48
    assert f.input_ids[:10] == full.input_ids[:10]  # the start of the context is kept
    assert tokenizer.decode(f.input_ids).endswith("\nAnswer:<|endoftext|>")


def test_score_prints_v2_keys(tmp_path, capsys):
    data, preds, probs = tmp_path / "v2.json", tmp_path / "p.json", tmp_path / "na.json"
    data.write_text(json.dumps(_v2()))
    answers = {f"q{i}": "" for i in range(1, 7)}  # "no answer" everywhere: right on q2 and q5 only
    preds.write_text(json.dumps(answers))
    probs.write_text(json.dumps({k: 0.5 for k in answers}))
    assert main(["score", str(data), str(preds)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["exact"] == pytest.approx(100 * 2 / 6) and scores["NoAns_exact"] == 100.0
    assert scores["HasAns_total"] == 4 and "best_f1" not in scores
    assert main(["score", str(data), str(preds), "--na-prob-file", str(probs), "--na-prob-thresh", "0.4"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["exact"] == pytest.approx(100 * 2 / 6) and {"best_exact", "best_f1_thresh"} <= set(scores)
    v1 = tmp_path / "v1.json"
    v1.write_text(json.dumps(V1))
    assert main(["score", str(v1), str(preds)]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"exact_match", "f1"}


def test_score_flat_rows_without_answers_and_bad_na_probs(tmp_path, capsys):
    ctx = "The mill was rebuilt in 1820."
    data, preds, probs = tmp_path / "q.jsonl", tmp_path / "p.json", tmp_path / "na.json"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"id": "x", "context": ctx, "question": "When?", "answers": {"text": ["1820"], "answer_start": [24]}},
        {"id": "y", "context": ctx, "question": "Who?", "answers": {"text": [], "answer_start": []}}]))
    preds.write_text(json.dumps({"x": "the 1820.", "y": ""}))
    assert main(["score", str(data), str(preds)]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "exact": 100.0, "f1": 100.0, "total": 2, "HasAns_exact": 100.0, "HasAns_f1": 100.0, "HasAns_total": 1,
        "NoAns_exact": 100.0, "NoAns_f1": 100.0, "NoAns_total": 1}
    probs.write_text(json.dumps({"x": 0.1}))
    assert main(["score", str(data), str(preds), "--na-prob-file", str(probs)]) != 0
    assert "na.json: no no-answer probability for 1 predicted questions, e.g. y" in capsys.readouterr().err


def test_evaluate_takes_allow_unanswerable():
    from loraqa.cli import build_parser

    assert build_parser().parse_args(["evaluate", "--allow-unanswerable"]).allow_unanswerable is True


def test_train_and_evaluate_on_a_v2_file_score_with_the_v2_rules(tiny_model_dir, tmp_path):
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(_v2()))
    assert main(["train", "--model", str(tiny_model_dir), "--train-file", str(path), "--eval-file", str(path),
                 "--epochs", "1", "--max-length", "128", "--max-new-tokens", "4", "--precision", "fp32",
                 "--output-dir", str(tmp_path / "run"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    v2 = metrics["squad_v2"]
    assert (v2["total"], v2["HasAns_total"], v2["NoAns_total"]) == (6, 4, 2)
    assert (metrics["exact_match"], metrics["f1"]) == (v2["exact"], v2["f1"])
    predictions = json.loads((tmp_path / "run" / "predictions.json").read_text())
    no_ans_right = sum(not predictions[q].strip() for q in ("q2", "q5"))  # tiny model: whatever it says
    assert v2["NoAns_exact"] == pytest.approx(100 * no_ans_right / 2)


def test_no_answer_probability_is_the_first_step_probability_of_eos(tiny_model, tokenizer, examples):
    features, _ = build_eval_features(tokenizer, examples, DEFAULT_TEMPLATE, 512, 6)
    na_probs: dict[str, float] = {}
    predict(tiny_model, tokenizer, features, DecodeSettings(512, batch_size=4, max_new_tokens=6), torch.device("cpu"),
            progress=False, na_probs=na_probs)
    assert set(na_probs) == {f.id for f in features}
    with torch.no_grad():  # each prompt alone, no padding, no shared prefix
        alone = {f.id: tiny_model(torch.tensor([f.input_ids])).logits[0, -1].softmax(-1)[tokenizer.eos_token_id].item()
                 for f in features}
    assert na_probs == pytest.approx(alone, rel=1e-4, abs=1e-7)


def test_the_no_answer_phrase_is_the_empty_answer(tiny_model, tokenizer, examples):
    features, _ = build_eval_features(tokenizer, examples, DEFAULT_TEMPLATE, 512, 6)
    settings = DecodeSettings(512, batch_size=4, max_new_tokens=6)
    run = dict(model=tiny_model, tokenizer=tokenizer, features=features, device=torch.device("cpu"), progress=False)
    plain = predict(settings=settings, **run)
    said = next(a for a in plain.values() if a)  # whatever the tiny model says, taken as its "no answer"
    na_probs: dict[str, float] = {}
    mapped = predict(settings=replace(settings, no_answer_text=said), na_probs=na_probs, **run)
    assert mapped == {k: "" if a == said else a for k, a in plain.items()}
    assert no_answer_token(tokenizer, said) == target_ids(tokenizer, said)[0] != tokenizer.eos_token_id
    assert no_answer_token(tokenizer) == tokenizer.eos_token_id and all(0 <= p <= 1 for p in na_probs.values())


def test_train_on_v2_writes_na_probs_that_score_gives_the_same_best_thresholds(tiny_model_dir, tmp_path, capsys):
    from loraqa.model.lora import adapter_settings

    path = tmp_path / "v2.json"
    path.write_text(json.dumps(_v2()))
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--train-file", str(path), "--eval-file", str(path),
                 "--epochs", "1", "--max-length", "128", "--max-new-tokens", "4", "--precision", "fp32",
                 "--no-answer-text", "unknown", "--output-dir", str(run), "--quiet"]) == 0
    capsys.readouterr()
    metrics = json.loads((run / "metrics.json").read_text())
    na_probs = json.loads((run / "na_probs.json").read_text())
    assert set(na_probs) == {f"q{i}" for i in range(1, 7)} and all(0 <= p <= 1 for p in na_probs.values())
    assert main(["score", str(path), str(run / "predictions.json"), "--na-prob-file", str(run / "na_probs.json")]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored == pytest.approx(metrics["squad_v2"]) and "best_f1_thresh" in scored
    assert adapter_settings(run / "adapter")["no_answer_text"] == "unknown"  # ask and serve map it to ""


def test_ask_marks_no_answer(tiny_model_dir, tmp_path, capsys):
    common = ["ask", "--model", str(tiny_model_dir), "--max-new-tokens", "5", "--precision", "fp32"]
    question = ["--context", "The mill was rebuilt in 1887.", "--question", "When?"]
    assert main([*common, *question]) == 0
    said = capsys.readouterr().out.strip()
    if not said:
        pytest.skip("the tiny model said nothing here")
    assert main([*common, *question, "--no-answer-text", said]) == 0  # its answer taken as its "no answer"
    out = capsys.readouterr()
    assert out.out == "\n" and "no answer" in out.err
    rows = tmp_path / "q.jsonl"
    rows.write_text(json.dumps({"context": "The mill was rebuilt in 1887.", "question": "When?"}) + "\n")
    assert main([*common, "--input", str(rows), "--no-answer-text", said]) == 0
    assert json.loads(capsys.readouterr().out) == {"id": "1", "question": "When?", "answer": "", "no_answer": True}


def test_na_prob_thresh_not_the_argmax_decides_whether_to_answer(tiny_model, tokenizer, examples):
    features, _ = build_eval_features(tokenizer, examples, DEFAULT_TEMPLATE, 512, 6)
    run = dict(tokenizer=tokenizer, features=features, device=torch.device("cpu"), progress=False)
    settings = DecodeSettings(512, batch_size=4, max_new_tokens=6)
    first_tokens = predict(tiny_model, settings=replace(settings, max_new_tokens=1), **run)
    eos = tokenizer.eos_token_id
    # EOS made every step's argmax: greedy says "no answer" to everything, P(no answer) ~ 1
    def eos_first(module, args, out):
        out.logits[..., eos] += 50.0

    hook = tiny_model.register_forward_hook(eos_first)
    try:
        assert set(predict(tiny_model, settings=settings, **run).values()) == {""}
        na_probs: dict[str, float] = {}
        kept = predict(tiny_model, settings=replace(settings, na_prob_thresh=1.0), na_probs=na_probs, **run)
        dropped = predict(tiny_model, settings=replace(settings, na_prob_thresh=0.5), **run)
    finally:
        hook.remove()
    assert min(na_probs.values()) > 0.5
    assert kept == first_tokens  # below the threshold: the likeliest other first token, then EOS
    assert set(dropped.values()) == {""}


def test_na_prob_thresh_splits_questions_by_their_probability(tiny_model, tokenizer, examples):
    features, _ = build_eval_features(tokenizer, examples, DEFAULT_TEMPLATE, 512, 6)
    settings = DecodeSettings(512, batch_size=4, max_new_tokens=6)
    run = dict(model=tiny_model, tokenizer=tokenizer, features=features, device=torch.device("cpu"), progress=False)
    na_probs: dict[str, float] = {}
    plain = predict(settings=settings, na_probs=na_probs, **run)
    thresh = sorted(na_probs.values())[len(na_probs) // 2]
    answers = predict(settings=replace(settings, na_prob_thresh=thresh), **run)
    assert any(p > thresh for p in na_probs.values()) and any(p <= thresh for p in na_probs.values())
    for qid, p in na_probs.items():
        if p > thresh:
            assert answers[qid] == ""
        elif plain[qid]:  # its first token was not EOS, so nothing changes
            assert answers[qid] == plain[qid]


def test_na_prob_thresh_is_checked_and_reaches_ask(tiny_model_dir, capsys):
    with pytest.raises(ValueError, match=r"--na-prob-thresh must be in \[0, 1\], got 1.5"):
        Config(na_prob_thresh=1.5)
    with pytest.raises(ValueError, match="--na-prob-thresh applies to generation"):
        Config(na_prob_thresh=0.5, method="span")
    common = ["ask", "--model", str(tiny_model_dir), "--max-new-tokens", "5", "--precision", "fp32",
              "--context", "The mill was rebuilt in 1887.", "--question", "When?"]
    assert main([*common, "--na-prob-thresh", "0"]) == 0  # any probability above 0: no answer
    out = capsys.readouterr()
    assert out.out == "\n" and "no answer" in out.err
