"""`loraqa serve` with several adapters, driven by the official `openai` client on loopback: the
OpenAI routes answer as `/answer` and `loraqa ask` do, requests for different adapters share batches
and get what each adapter alone gives, adapters load and unload while clients ask, and `/metrics`
parses and counts. Every loop here is bounded in count and time."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import SQUAD, make_adapter, request, start_server

from loraqa.config import load_config
from loraqa.data.prompt import format_prompt
from loraqa.data.squad import load_squad_file
from loraqa.serve.access import Access
from loraqa.inference.answerer import ask, load_answerer
from loraqa.serve.app import build_app
from loraqa.serve.service import Limits
from loraqa.model.multilora import BASE

ADMIN = "admin-secret"
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: str(make_adapter(tiny_llama_dir, root / name, seed)) for seed, name in enumerate(["a", "b", "c"], 1)}


@pytest.fixture(scope="module")
def config(tiny_llama_dir):
    return load_config(None, {"model": str(tiny_llama_dir), "precision": "fp32", "max_new_tokens": NEW_TOKENS})


@pytest.fixture(scope="module")
def examples():
    return load_squad_file(SQUAD)


@pytest.fixture(scope="module")
def server(config, adapters, examples, tmp_path_factory):
    """A server holding adapters a and b (c is loaded by a test), with an admin key."""
    answerer = load_answerer(config, None, examples, named=[("a", adapters["a"]), ("b", adapters["b"])])
    url, stop = start_server(build_app(answerer, Limits(max_batch_size=8, max_wait_ms=50), access=Access(admin_key=ADMIN),
                                       adapter_root=str(tmp_path_factory.getbasetemp())))
    yield url, answerer
    stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=30)


def _prompt(ex):
    return format_prompt("Context: {context}\nQuestion: {question}\nAnswer:", ex.context, ex.question)


def _messages(ex):
    return [{"role": "system", "content": ex.context}, {"role": "user", "content": ex.question}]


def test_models_lists_the_base_and_each_adapter_with_its_parent(server, client, config):
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == [config.model, "a", "b"]
    assert models["a"].parent == config.model and models[config.model].parent is None


@pytest.mark.parametrize("model", ["a", "base"])
def test_completions_and_chat_give_the_answer_of_answer_and_of_ask(model, server, client, config, adapters,
                                                                    examples):
    url, _ = server
    name = config.model if model == "base" else model
    expected = ask(config, None if model == "base" else adapters[model], examples)  # merged, one question batch
    for ex in examples:
        status, reply = request(f"{url}/answer", {"context": ex.context, "question": ex.question, "model": name})
        assert status == 200 and reply["answer"] == expected[ex.id]
        text = client.completions.create(model=name, prompt=_prompt(ex), max_tokens=NEW_TOKENS).choices[0].text
        chat = client.chat.completions.create(model=name, messages=_messages(ex)).choices[0].message.content
        streamed = "".join(c.choices[0].text for c in client.completions.create(model=name, prompt=_prompt(ex),
                                                                                 stream=True) if c.choices)
        chat_streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=name, messages=_messages(ex), stream=True) if c.choices)
        assert text == chat == streamed == chat_streamed == expected[ex.id], ex.id


def test_usage_max_tokens_and_stop(server, client, examples):
    wholes = [(ex, client.completions.create(model="a", prompt=_prompt(ex))) for ex in examples]
    # an answer of several tokens and characters, so that max_tokens and stop both cut it
    ex, whole = next((ex, w) for ex, w in wholes if w.usage.completion_tokens > 1 and len(w.choices[0].text) > 2)
    assert whole.usage.prompt_tokens > 0 and whole.usage.total_tokens == whole.usage.prompt_tokens + \
        whole.usage.completion_tokens
    one = client.completions.create(model="a", prompt=_prompt(ex), max_tokens=1)
    assert one.usage.completion_tokens == 1
    assert one.choices[0].finish_reason == "length" and whole.choices[0].text.startswith(one.choices[0].text)
    answer = whole.choices[0].text
    cut = client.completions.create(model="a", prompt=_prompt(ex), stop=[answer[2:]])
    assert cut.choices[0].text == answer[:2].rstrip() and cut.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="a", prompt=_prompt(ex), stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_what_is_not_served_is_refused_in_openais_shape(server, client, examples):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nobody", prompt=_prompt(examples[0]))
    assert e.value.body["code"] == "model_not_found" and "GET /v1/models lists" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="answers greedily"):
        client.chat.completions.create(model="a", messages=_messages(examples[0]), temperature=0.7)
    with pytest.raises(openai.BadRequestError, match="system message"):
        client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Who?"}])
    assert client.completions.create(model="a", prompt=_prompt(examples[0]), temperature=0).choices


def test_mixed_adapter_batches_answer_as_each_adapter_alone(server, config, examples):
    """Questions for the base, a and b sent at once share batches; each gets what its adapter gives
    in batches of its own (fp32)."""
    url, answerer = server
    asks = [(ex, name) for ex in examples for name in (config.model, "a", "b")]
    batches_before = request(f"{url}/health")[1]["batches"]
    with ThreadPoolExecutor(len(asks)) as pool:
        replies = list(pool.map(lambda p: request(f"{url}/answer", {"context": p[0].context, "question": p[0].question,
                                                                     "model": p[1]}), asks))
    assert request(f"{url}/health")[1]["batches"] - batches_before < len(asks) / 2  # decoded together
    features, _ = answerer.features(examples)
    for name in (config.model, "a", "b"):
        alone = answerer.decode(features, {f.id: ex.context for f, ex in zip(features, examples)},
                                adapters={f.id: BASE if name == config.model else answerer.adapters.handle(name)
                                              for f in features})
        got = {ex.id: reply["answer"] for (ex, n), (status, reply) in zip(asks, replies) if n == name}
        assert got == {f.id: alone[f.id] for f in features}, name
    assert len({tuple(r[1]["answer"] for r in replies[i::3]) for i in range(3)}) > 1  # the adapters differ


def test_adapters_load_and_unload_while_eight_clients_ask(server, client, adapters, examples):
    url, _ = server
    stop, errors, answered = threading.Event(), [], [0]

    def keep_asking(n: int) -> None:
        ex = examples[n % len(examples)]
        for _ in range(40):  # bounded in count, and by the event
            if stop.is_set():
                return
            status, reply = request(f"{url}/answer", {"context": ex.context, "question": ex.question,
                                                      "model": "a" if n % 2 else client.models.list().data[0].id})
            if status != 200:
                errors.append((status, reply))
            answered[0] += 1

    threads = [threading.Thread(target=keep_asking, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    try:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        assert request(f"{url}/v1/load_lora_adapter", {"lora_name": "c", "lora_path": adapters["c"]})[0] == 401
        status, reply = request(f"{url}/v1/load_lora_adapter", {"lora_name": "c", "lora_path": adapters["c"]}, headers)
        assert status == 200 and "c" in reply["models"]
        assert client.completions.create(model="c", prompt=_prompt(examples[0])).choices
        status, reply = request(f"{url}/v1/unload_lora_adapter", {"lora_name": "b"}, headers)
        assert status == 200 and "b" not in reply["models"]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="b", prompt=_prompt(examples[0]))
        status, reply = request(f"{url}/v1/load_lora_adapter", {"lora_name": "b", "lora_path": adapters["b"]}, headers)
        assert status == 200  # and back, under the same name
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors and answered[0] >= 8


def test_an_adapter_for_another_base_is_refused_in_one_line(server, tiny_model_dir, tmp_path):
    url, _ = server
    gpt2 = make_adapter(tiny_model_dir, tmp_path / "gpt2-adapter")  # c_attn: not a layer of the Llama
    status, reply = request(f"{url}/v1/load_lora_adapter", {"lora_name": "g", "lora_path": str(gpt2)},
                            {"Authorization": f"Bearer {ADMIN}"})
    assert status == 400 and "is not in the base model: made for another one" in reply["error"]
    assert "\n" not in reply["error"] and "g" not in request(f"{url}/health")[1]["models"]


def test_metrics_parse_and_count_what_happens(server, examples):
    from prometheus_client.parser import text_string_to_metric_families

    url, _ = server

    def scrape() -> dict:
        import urllib.request

        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
            text = r.read().decode()
        return {s.name + json.dumps(s.labels, sort_keys=True): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    before = scrape()
    assert {"loraqa_num_requests_waiting{}", "loraqa_num_requests_running{}", "loraqa_kv_cache_usage_perc{}",
            "loraqa_lora_adapters_loaded{}"} <= set(before)
    info = [k for k in before if k.startswith("loraqa_lora_requests_info")]
    assert len(info) == 1 and '"max_lora": "' in info[0]
    request(f"{url}/answer", {"context": examples[0].context, "question": examples[0].question, "model": "a"})
    request(f"{url}/answer", {"context": examples[0].context})  # 422
    after = scrape()
    assert after["loraqa_answers_total{}"] == before.get("loraqa_answers_total{}", 0) + 1
    assert after['loraqa_responses_4xx_total{"code": "422"}'] == before.get('loraqa_responses_4xx_total{"code": "422"}', 0) + 1
    assert after['loraqa_request_latency_seconds_count{"route": "/answer"}'] >= 1


def test_answers_carry_their_offsets_in_the_passage(server, examples):
    url, _ = server
    for ex in examples:
        status, reply = request(f"{url}/answer", {"context": ex.context, "question": ex.question, "model": "a"})
        if reply["start"] is None:
            assert reply["answer"] not in ex.context or not reply["answer"]
        else:
            assert ex.context[reply["start"]:reply["end"]] == reply["answer"]


def _read_response(sock: socket.socket) -> str:
    """One HTTP response, headers and the Content-Length of body: they may come in several reads."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _content_length(data):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode()


def _content_length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_a_long_prompt_and_a_stalled_body_are_refused_with_the_numbers(config, examples, monkeypatch):
    from loraqa.serve import request as request_module

    monkeypatch.setattr(request_module, "READ_SECONDS", 1.0)
    answerer = load_answerer(config, None, examples)
    url, stop = start_server(build_app(answerer, Limits(max_prompt_tokens=20)))
    try:
        status, reply = request(f"{url}/answer", {"context": examples[0].context, "question": examples[0].question})
        assert status == 413 and "over this server's --max-prompt-tokens 20" in reply["error"]
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:  # says 100 bytes, sends 10
            sock.sendall(b"POST /answer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"context\"")
            start = time.monotonic()
            reply = _read_response(sock)
            sock.settimeout(3)  # closed with the 408, not kept alive for another request (uvicorn's 5 s)
            assert sock.recv(1) == b""
        assert reply.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in reply
        assert time.monotonic() - start < 30  # cut at its deadline, not held open
    finally:
        stop()


def test_a_request_that_fails_in_a_batch_fails_alone_without_its_exception(config, examples, capsys):
    from loraqa.inference.answerer import Answerer

    class Fails(Answerer):
        def decode(self, features, contexts, progress=False, **options):
            if any("POISON" in c for c in contexts.values()):
                raise RuntimeError("secret internals")
            return super().decode(features, contexts, progress, **options)

    plain = load_answerer(config, None, examples)
    fails = Fails(**{k: getattr(plain, k) for k in plain.__dataclass_fields__})
    url, stop = start_server(build_app(fails, Limits(max_wait_ms=200)))
    try:
        bodies = [{"context": "POISON " + examples[0].context, "question": "Who?"}] + \
                 [{"context": ex.context, "question": ex.question} for ex in examples]
        with ThreadPoolExecutor(len(bodies)) as pool:
            replies = list(pool.map(lambda b: request(f"{url}/answer", b), bodies))
    finally:
        stop()
    assert replies[0][0] == 500 and "secret" not in replies[0][1]["error"] and "request " in replies[0][1]["error"]
    assert [r[0] for r in replies[1:]] == [200] * len(examples)
    rid = replies[0][1]["error"].split("request ")[1].split(";")[0]
    assert f"request {rid} failed: RuntimeError: secret internals" in capsys.readouterr().err
