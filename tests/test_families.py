"""Every family of tests/families.py as a user meets it, in fp32: ``ask``, ``evaluate`` and ``serve``
give the answers of transformers' own greedy ``generate`` run one question at a time (the same stops,
EOS or any newline token, and the same answer cut), on the path the family's table row names, in
batches that mix passages, whose rows end at different steps and are carried into the next batch; the
training loss equals transformers' own on the same batch; a LoRA step runs; ``export`` writes the
architectures it knows and refuses the others in one line."""

from __future__ import annotations

import gzip
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import build_tokenizer, request, start_server
from families import FAMILIES, MAX_LENGTH, MIXED

from loraqa.config import DEFAULT_TEMPLATE, load_config
from loraqa.data.batching import collate_context_train
from loraqa.data.features import build_eval_features, build_train_features, collate_train
from loraqa.data.squad import load_squad_file
from loraqa.evaluate import run_evaluate
from loraqa.inference.answerer import ask, load_answerer
from loraqa.inference.generate import answer_text, stop_token_ids
from loraqa.serve.app import build_app
from loraqa.serve.service import Limits
from loraqa.model.lora import add_lora
from loraqa.model.support import passages_apart_differ
from loraqa.training.loss import answer_loss_sum, answer_tokens

NEW_TOKENS = 10
PASSAGES, QUESTIONS = 3, 15  # as the check, 16 questions from three passages, near enough
BATCH = 4  # a passage's 5 questions take two batches, one of them shared with another passage
ids = [f.id for f in FAMILIES]


@pytest.fixture(scope="module")
def squad_file(tmp_path_factory):
    """The bundled sample's first three passages, 15 questions in all, as a SQuAD v1.1 file."""
    from loraqa.data.load import sample_file

    data = json.loads(gzip.open(sample_file("eval")).read())
    takes = [5, 5, 5]  # questions from each passage (the sample holds at most 5 a passage)
    paragraphs = [p for article in data["data"] for p in article["paragraphs"] if len(p["qas"]) >= max(takes)]
    paragraphs = [{**p, "qas": p["qas"][:n]} for p, n in zip(paragraphs, takes)]
    path = tmp_path_factory.mktemp("squad") / "sixteen.json"
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tokenizer()
    tok.pad_token = tok.eos_token
    return tok


def _saved(family, tokenizer, features, folder):
    model = family.build(tokenizer)
    _end_at_different_steps(model, _generated(model, tokenizer, features), tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def _generated(model, tokenizer, features) -> dict[str, list[int]]:
    """transformers' greedy generate, one question at a time: each question's tokens up to its first
    stop token (EOS or a newline token)."""
    stops = stop_token_ids(tokenizer)
    made = {}
    with torch.inference_mode():
        for f in features:
            ids_ = torch.tensor([f.input_ids])
            out = model.generate(ids_, attention_mask=torch.ones_like(ids_), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.eos_token_id)
            tokens = out[0, ids_.shape[1]:].tolist()
            made[f.id] = tokens[:next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))]
    return made


def _end_at_different_steps(model, made: dict[str, list[int]], eos: int) -> None:
    """A random tiny model almost never chooses EOS or a newline: every answer would run to
    NEW_TOKENS and every row leave its batch at the same step. So EOS's output row becomes 1.01 x that
    of a token the model does choose (greedy, EOS then wins wherever that token did): the token that
    cuts the answers (``made``) at the most different places, leaving few empty and most unlike."""
    def score(token):  # (few empty answers, their lengths, different answers)
        cut = [m[:m.index(token)] if token in m else m for m in made.values()]
        return sum(not c for c in cut) <= 0.2 * len(cut), len({len(c) for c in cut}), len({tuple(c) for c in cut})

    token = max(sorted({t for m in made.values() for t in m[1:]}), key=score)
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight[eos] = 1.01 * head.weight[token]
        if getattr(head, "bias", None) is not None:
            head.bias[eos] = head.bias[token]


def _admitted(monkeypatch) -> list[tuple[int, int]]:
    """Each batch the decoder admits, as (passages in it, rows carried into it), filled as it runs.
    Every batch hands the rows it has left on to the next once its first tokens are chosen (by default
    only its last quarter, so whether any is carried would hang on where random answers end)."""
    from loraqa.inference import decoder

    monkeypatch.setattr(decoder, "CARRY_SHARE", 1)
    seen, admit = [], decoder._admit

    def spy(model, batch, max_new_tokens, pool, carried, *rest):
        seen.append((batch.prefix[0].size(0), 0 if carried is None else len(carried.tags)))
        return admit(model, batch, max_new_tokens, pool, carried, *rest)

    monkeypatch.setattr(decoder, "_admit", spy)
    return seen


@pytest.mark.parametrize("family", FAMILIES, ids=ids)
def test_ask_evaluate_and_serve_answer_as_transformers_generate(family, tokenizer, squad_file, tmp_path,
                                                              monkeypatch):
    examples = load_squad_file(squad_file)
    assert len(examples) == QUESTIONS and len({ex.context for ex in examples}) == PASSAGES
    features, _ = build_eval_features(tokenizer, examples, DEFAULT_TEMPLATE, MAX_LENGTH, NEW_TOKENS)
    model = _saved(family, tokenizer, features, tmp_path / "model")
    made = _generated(model, tokenizer, features)
    expected = {q: answer_text(tokenizer, tokens) for q, tokens in made.items()}
    # answers worth comparing: most not empty, not all alike
    assert sum(map(bool, expected.values())) >= 0.8 * QUESTIONS and len(set(expected.values())) > QUESTIONS // 3
    settings = {"model": str(tmp_path / "model"), "precision": "fp32", "max_new_tokens": NEW_TOKENS,
                "max_length": MAX_LENGTH, "eval_batch_size": BATCH}

    admitted = _admitted(monkeypatch)
    assert ask(load_config(None, settings), None, examples) == expected
    fast = [f for f in features
            if family.path != "generate" and f.n_prompt + NEW_TOKENS <= (family.longest or MAX_LENGTH)]
    if fast:  # the decoder's cases: rows of several passages, ending at different steps, carried on
        assert max(passages for passages, _ in admitted) > 1 and sum(carried for _, carried in admitted) > 0
        assert len({len(made[f.id]) for f in fast}) > 1
    monkeypatch.undo()  # evaluate and serve as they are

    metrics = run_evaluate(load_config(None, {**settings, "eval_file": str(squad_file),
                                              "output_dir": str(tmp_path / "run")}), progress=False)
    assert json.loads((tmp_path / "run" / "predictions.json").read_text()) == expected
    longer = len(features) - len(fast)
    assert metrics["answering_path"] == family.path
    assert metrics["eval_generate_questions"] == longer
    if family.longest == MIXED:
        assert 0 < longer < len(features)  # both paths answer: the window (or rope limit) splits the questions

    answerer = load_answerer(load_config(None, settings), None, examples)
    url, stop = start_server(build_app(answerer, Limits(max_batch_size=8, max_wait_ms=50)))
    try:
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda ex: request(f"{url}/answer", {"context": ex.context,
                                                                         "question": ex.question}), examples))
    finally:
        stop()
    assert [r[1].get("answer", r) for r in replies] == [expected[ex.id] for ex in examples]


@pytest.mark.parametrize("family", FAMILIES, ids=ids)
def test_the_training_loss_is_transformers_own_and_a_lora_step_runs(family, tokenizer, squad_file):
    examples = load_squad_file(squad_file)[:8]
    model = family.build(tokenizer)
    features, _ = build_train_features(tokenizer, examples, DEFAULT_TEMPLATE, MAX_LENGTH)
    plain = collate_train(features, tokenizer.pad_token_id)
    # a rope that changes with a forward's longest position (LongRoPE, dynamic NTK) cannot run passages apart
    # from their questions: training takes plain batches there (--group-by-passage is off, said in the log)
    apart = passages_apart_differ(model) is None
    assert apart == (family.rope_limit is None)
    with torch.no_grad():
        theirs = model(**plain).loss  # transformers' own: labels -100 on the prompt and the padding
        for batch in (plain, collate_context_train(features, tokenizer.pad_token_id))[:2 if apart else 1]:
            torch.testing.assert_close(answer_loss_sum(model, batch) / answer_tokens(batch), theirs,
                                       rtol=2e-5, atol=1e-6)

    lora = add_lora(model, lora_dropout=0.0)  # the family's default targets (PEFT's, or its attention projections)
    before = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    loss = answer_loss_sum(lora, plain) / answer_tokens(plain)
    loss.backward()
    optimizer.step()
    changed = [n for n, p in lora.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert torch.isfinite(loss) and changed and all("lora_" in n for n in changed)


@pytest.mark.parametrize("family", FAMILIES, ids=ids)
def test_export_writes_what_it_knows_and_refuses_the_rest_in_one_line(family, tokenizer, tmp_path):
    from loraqa.export.layout import ARCHITECTURES
    from loraqa.export.writer import write_model
    from loraqa.model.load import load_model

    model = family.build(tokenizer)
    refused = (f"this model is '{family.model_type}'" if family.model_type not in ARCHITECTURES
               else "export does not write rope scaling" if family.rope_limit else None)
    if refused:
        with pytest.raises(ValueError, match=refused) as e:
            write_model(model, tokenizer, tmp_path / "m.gguf", "f32", progress=False)
        assert "\n" not in str(e.value) and not (tmp_path / "m.gguf").exists()
        return
    path = write_model(model, tokenizer, tmp_path / "m.gguf", "f32", progress=False)
    text = torch.tensor([tokenizer("Context: the mill\nQuestion: when?\nAnswer:")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(path)).eval()(text).logits, model(text).logits, atol=1e-5, rtol=0)
