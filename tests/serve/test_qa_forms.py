"""The requests LangChain, LlamaIndex and Haystack send from their default question-answering chains
(recorded by scripts/record_framework_requests.py, with each framework's version) read as the passage
and question they carry, and answered over HTTP as /answer answers them."""

import json
import urllib.request

import pytest
from conftest import FIXTURES, request, start_server

from loraqa.serve.qa_forms import read_messages, read_text

RECORDED = sorted((FIXTURES / "frameworks").glob("*.json"))


def _cases():
    return [pytest.param(case, id=f"{path.stem}-{n}") for path in RECORDED
            for n, case in enumerate(json.loads(path.read_text())["cases"])]


def _read(body: dict):
    texts = {}
    for m in body["messages"]:
        texts["user" if m["role"] == "user" else "system"] = m["content"]
    return read_messages(texts.get("system"), texts["user"]) if "user" in texts else read_text(texts["system"])


@pytest.mark.parametrize("case", _cases())
def test_each_frameworks_request_is_read_as_its_passage_and_question(case):
    qa = _read(case["request"])
    assert (qa.context, qa.question) == (case["passage"], case["question"])
    assert qa.form != "system passage"  # every framework shape is recognised as such


def test_forms_by_labels_either_order_and_chunks_joined():
    qa = read_text("Answer from the context.\nQuestion: Who rebuilt it?\nContext: The mill was rebuilt.\nAnswer:")
    assert (qa.context, qa.question, qa.form) == ("The mill was rebuilt.", "Who rebuilt it?", "labels")
    qa = read_text("Context:\nFirst chunk.\n\nSecond chunk.\n\nQuestion: What?")
    assert qa.context == "First chunk.\n\nSecond chunk." and qa.question == "What?"
    assert read_text("Tell me a story about mills.") is None
    assert read_messages("The mill was rebuilt in 1887.", "When?").form == "system passage"  # the route's own shape
    assert read_messages("You are an expert Q&A system. Be brief.", "When was it rebuilt?") is None


def test_llama_index_refine_keeps_its_answer_where_the_new_context_has_none():
    case = json.loads((FIXTURES / "frameworks" / "llama-index-refine.json").read_text())["cases"][0]
    qa = _read(case["request"])
    assert qa.existing == "1887" and qa.form == "llama-index chat refine"


def test_over_http_each_framework_gets_answers_of_answer(tiny_model_dir, examples):
    """The app answers every recorded request as /answer answers its passage and question, and a
    request with neither is a 400 naming the shapes."""
    from loraqa.config import load_config
    from loraqa.inference.answerer import load_answerer
    from loraqa.serve.app import build_app
    from loraqa.serve.service import Limits

    answerer = load_answerer(load_config(None, {"model": str(tiny_model_dir), "max_new_tokens": 6}), None, examples)
    url, stop = start_server(build_app(answerer, Limits()))
    try:
        for param in _cases():
            case = param.values[0]
            body = {**case["request"], "model": answerer.name}
            status, reply = request(f"{url}/v1/chat/completions", body)
            _, expected = request(f"{url}/answer", {"context": case["passage"], "question": case["question"]})
            assert status == 200, reply
            answer = reply["choices"][0]["message"]["content"]
            existing = _read(case["request"]).existing
            assert answer == (expected["answer"] or existing or ""), param.id
        status, reply = request(f"{url}/v1/chat/completions", {"model": answerer.name, "messages": [
            {"role": "user", "content": "Tell me a story."}]})
        assert status == 400 and "Context: ..." in reply["error"]["message"]
        metrics = urllib.request.urlopen(f"{url}/metrics").read().decode()
        assert 'loraqa_request_forms_total{form="llama-index text_qa"} 2.0' in metrics
    finally:
        stop()
