"""The OpenAI routes answer what ``/answer`` answers, whatever the server's settings (an abstaining
model, answers held to the passage), and refuse what they would not honour with a 400 naming the
parameter, in OpenAI's shape."""

import openai
import pytest
from conftest import SQUAD, request, start_server

from loraqa.config import load_config
from loraqa.data.prompt import format_prompt
from loraqa.data.squad import load_squad_file
from loraqa.inference.answerer import load_answerer
from loraqa.serve.app import build_app
from loraqa.serve.openai_api import error_body
from loraqa.serve.service import Limits

NEW_TOKENS = 6


def _server(model_dir, **settings):
    examples = load_squad_file(SQUAD)
    config = load_config(None, {"model": str(model_dir), "precision": "fp32", "max_new_tokens": NEW_TOKENS,
                                **settings})
    url, stop = start_server(build_app(load_answerer(config, None, examples), Limits(max_wait_ms=10)))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    return url, stop, client, config, examples


def _prompt(ex):
    return format_prompt("Context: {context}\nQuestion: {question}\nAnswer:", ex.context, ex.question)


def test_an_abstaining_model_says_nothing_on_every_route(tiny_llama_dir):
    """With a no-answer phrase and a threshold every question passes, /answer says "" for each: so must
    /v1 (it said the phrase, or its first token and what followed)."""
    url, stop, client, config, examples = _server(tiny_llama_dir, no_answer_text="unanswerable", na_prob_thresh=0.0)
    try:
        for ex in examples[:3]:
            status, reply = request(f"{url}/answer", {"context": ex.context, "question": ex.question})
            assert status == 200 and reply["answer"] == "" and reply["no_answer"]
            text = client.completions.create(model=config.model, prompt=_prompt(ex)).choices[0].text
            chat = client.chat.completions.create(model=config.model, messages=[
                {"role": "system", "content": ex.context}, {"role": "user", "content": ex.question}])
            streamed = "".join(c.choices[0].text for c in client.completions.create(
                model=config.model, prompt=_prompt(ex), stream=True) if c.choices)
            assert text == chat.choices[0].message.content == streamed == ""
    finally:
        stop()


def test_a_raw_prompt_is_held_to_its_own_text(tiny_model_dir):
    """--constrain-to-context on a completion not in the template's form: the prompt is the passage."""
    url, stop, client, config, examples = _server(tiny_model_dir, constrain_to_context=True)
    try:
        answers = []
        for ex in examples:
            prompt = f"{ex.context}\n\n{ex.question} ->"  # not the template's form
            text = client.completions.create(model=config.model, prompt=prompt).choices[0].text
            assert " ".join(text.split()) in " ".join(prompt.split())
            answers.append(text)
        assert any(answers)  # it was "" for every one: the constraint held answers to an empty passage
    finally:
        stop()


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    url, stop, client, config, examples = _server(tiny_model_dir)
    yield url, client, config, examples
    stop()


@pytest.mark.parametrize("param, value", [
    ("top_p", 0.5), ("presence_penalty", 0.5), ("frequency_penalty", 1.0), ("logit_bias", {"1": 5}),
    ("echo", True), ("suffix", "x"), ("response_format", {"type": "json_object"}),
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("max_tokens", NEW_TOKENS + 1)])
def test_what_would_not_be_honoured_is_refused_naming_the_parameter(served, param, value):
    url, client, config, examples = served
    status, reply = request(f"{url}/v1/completions", {"model": config.model, "prompt": _prompt(examples[0]),
                                                      param: value})
    assert status == 400 and reply["error"]["param"] == param and reply["error"]["type"] == "invalid_request_error"
    assert param in reply["error"]["message"]


def test_neutral_values_and_ignored_parameters_are_answered(served):
    url, client, config, examples = served
    plain = client.completions.create(model=config.model, prompt=_prompt(examples[0])).choices[0].text
    same = client.completions.create(model=config.model, prompt=_prompt(examples[0]), top_p=1, presence_penalty=0,
                                     frequency_penalty=0, seed=7, user="u", max_tokens=NEW_TOKENS).choices[0].text
    assert same == plain


def test_client_errors_are_typed_as_such(served):
    url, client, config, examples = served
    status, reply = request(f"{url}/v1/completions", b"{}", {"Content-Type": "text/plain"})
    assert status == 415 and reply["error"]["type"] == "invalid_request_error"
    for status in (400, 404, 408, 413, 415, 421, 422):
        assert error_body(status, "x")["error"]["type"] == "invalid_request_error", status
    assert error_body(401, "x")["error"]["type"] == "authentication_error"
    assert error_body(504, "x")["error"]["type"] == "server_error"
    assert client.models.retrieve(config.model).id == config.model
