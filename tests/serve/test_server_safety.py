"""A server a team can share: API key, Host names, content type, any oversized body, a time limit,
and SIGTERM with requests in flight. Real uvicorn servers on 127.0.0.1 only."""

import ctypes.util
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import SQUAD, free_port
from loraqa.config import load_config
from loraqa.data.squad import load_squad_file
from loraqa.serve.access import Access, host_names
from loraqa.inference.answerer import Answerer, load_answerer
from loraqa.serve.app import build_app
from loraqa.serve.service import Limits
from loraqa.runtime import allocator
from conftest import request, start_server

QUESTION = {"context": "The mill was rebuilt in 1887 by the Müller family.", "question": "Who rebuilt the mill?"}


@pytest.fixture(scope="module")
def answerer(tiny_model_dir):
    config = load_config(None, {"model": str(tiny_model_dir), "precision": "fp32", "max_new_tokens": 5})
    return load_answerer(config, None, load_squad_file(SQUAD))


@pytest.fixture(scope="module")
def keyed(answerer):
    url, stop = start_server(build_app(answerer, Limits(request_timeout=30),
                                       access=Access("s3cret", host_names("127.0.0.1", []))))
    yield url
    stop()


def test_answers_need_the_key_and_health_does_not(keyed):
    assert request(f"{keyed}/answer", QUESTION)[0] == 401
    status, reply = request(f"{keyed}/answer", QUESTION, {"Authorization": "Bearer wrong"})
    assert status == 401 and "API key" in reply["error"] and "\n" not in reply["error"]
    status, reply = request(f"{keyed}/answer", QUESTION, {"Authorization": "Bearer s3cret"})
    assert status == 200 and "answer" in reply
    status, health = request(f"{keyed}/health")
    assert status == 200 and health["api_key"] is True


def test_a_client_without_a_key_that_announces_a_body_and_stalls_is_cut_off(keyed, monkeypatch):
    """Headers saying 1,000 bytes, then nothing: the 401 comes at the drain's deadline and the
    connection closes (it was held open for good: the deadline applied only after the key check)."""
    import socket

    from loraqa.serve import service

    monkeypatch.setattr(service, "DRAIN_SECONDS", 1.0)
    host, port = keyed.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(b"POST /answer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):  # until the server closes (the socket's 20 s timeout fails the test)
            data += chunk
    assert data.startswith(b"HTTP/1.1 401") and b"connection: close" in data.lower()


def test_a_foreign_host_and_a_body_not_sent_as_json_are_refused(keyed):
    key = {"Authorization": "Bearer s3cret"}
    status, reply = request(f"{keyed}/answer", QUESTION, {**key, "Host": "rebound.example:8000"})
    assert status == 421 and "rebound.example" in reply["error"]
    assert request(f"{keyed}/health", headers={"Host": "rebound.example"})[0] == 421
    assert request(f"{keyed}/health", headers={"Host": "localhost:1234"})[0] == 200
    status, reply = request(f"{keyed}/answer", json.dumps(QUESTION).encode(), {**key, "Content-Type": "text/plain"})
    assert status == 415 and "application/json" in reply["error"]  # what a cross-site form can send


def test_an_oversized_body_of_any_size_reads_its_413(keyed):
    key = {"Authorization": "Bearer s3cret"}
    big = b'{"context": "' + b"a" * (21 << 20) + b'", "question": "Who?"}'  # 21 MB, sent by urllib
    status, reply = request(f"{keyed}/answer", big, key)
    assert status == 413 and "body over" in reply["error"]
    import http.client  # the same body chunked, with no Content-Length

    host, port = keyed.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/answer", body=iter([big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20)]),
                       headers={**key, "Content-Type": "application/json"}, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and "body over" in json.loads(response.read())["error"]
    connection.close()
    assert request(f"{keyed}/answer", QUESTION, key)[0] == 200  # and the server goes on


@dataclasses.dataclass
class SlowAnswerer(Answerer):
    """Decodes as the real one, but takes 1.5 s for a passage that says SLOW."""

    def decode(self, features, contexts, progress=False, **options):
        if any("SLOW" in c for c in contexts.values()):
            time.sleep(1.5)
        return super().decode(features, contexts, progress, **options)


def test_a_request_past_the_timeout_gets_a_504_and_the_next_is_served(answerer):
    slow = SlowAnswerer(**{f.name: getattr(answerer, f.name) for f in dataclasses.fields(Answerer)})
    url, stop = start_server(build_app(slow, Limits(max_wait_ms=0, request_timeout=1.0)))
    try:
        status, reply = request(f"{url}/answer", {"context": "SLOW " + QUESTION["context"], "question": "Who?"})
        assert status == 504 and "--request-timeout 1 s" in reply["error"]
        status, reply = request(f"{url}/answer", QUESTION)
        assert status == 200 and "answer" in reply
    finally:
        stop()


def test_sigterm_answers_the_requests_in_flight_then_exits_0(tiny_model_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "loraqa.cli", "serve", "--model", str(tiny_model_dir),
                             "--port", str(port), "--precision", "fp32", "--max-new-tokens", "5",
                             "--max-wait-ms", "3000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k not in ("LORAQA_API_KEY", "LORAQA_ALLOCATOR")})
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                status, health = request(f"{url}/health")
                if status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        # the command runs itself again under jemalloc where the system has it: a server's memory stays flat
        here = allocator()  # a preloaded malloc is kept; glibc is replaced where jemalloc is installed
        assert health["allocator"] == ("jemalloc" if here == "glibc" and ctypes.util.find_library("jemalloc") else here)
        with ThreadPoolExecutor(4) as pool:  # a batch waits 3 s for company: SIGTERM comes while it waits
            replies = [pool.submit(request, f"{url}/answer", {**QUESTION, "question": q})
                       for q in ("Who rebuilt the mill?", "When?", "What burned?", "Who?")]
            while request(f"{url}/health")[1]["waiting"] < 4:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            answered = [r.result(timeout=60) for r in replies]
        assert [status for status, _ in answered] == [200] * 4 and all("answer" in r for _, r in answered)
        assert proc.wait(timeout=60) == 0
        assert "stopped (SIGTERM)" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
