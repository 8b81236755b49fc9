"""Who may use a server: the API key, the loopback rule and the Host names it answers to."""

import pytest

from loraqa.cli import main
from loraqa.serve.access import Access, check_bind, host_names, is_loopback, read_api_key, strip_port


def test_the_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("LORAQA_API_KEY", raising=False)
    assert read_api_key(None) is None
    monkeypatch.setenv("LORAQA_API_KEY", " from-env \n")
    assert read_api_key(None) == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    assert read_api_key(str(tmp_path / "key")) == "from-file"  # the file wins
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_api_key(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="cannot read"):
        read_api_key(str(tmp_path / "missing"))
    monkeypatch.setenv("LORAQA_API_KEY", "  ")
    with pytest.raises(ValueError, match="set but empty"):
        read_api_key(None)


def test_only_loopback_serves_without_a_key_unless_told_so():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.1.2.3", "example.org"))
    check_bind("127.0.0.1", None, False)
    check_bind("0.0.0.0", "k", False)
    check_bind("0.0.0.0", None, True)
    with pytest.raises(ValueError, match="LORAQA_API_KEY.*--api-key-file.*--unauthenticated"):
        check_bind("0.0.0.0", None, False)


def test_serve_on_the_network_without_a_key_refuses_to_start_in_one_line(monkeypatch, capsys):
    monkeypatch.delenv("LORAQA_API_KEY", raising=False)
    assert main(["serve", "--model", "no/such-model", "--host", "0.0.0.0"]) == 2  # before any loading
    err = capsys.readouterr().err.strip()
    assert err.startswith("loraqa serve: error: --host 0.0.0.0") and "\n" not in err


def test_host_names_and_the_key_check():
    loopback = Access("s3cret", host_names("127.0.0.1", ["qa.example.org"]))
    assert all(loopback.host_ok(h) for h in ("127.0.0.1:8000", "localhost", "LOCALHOST:1", "[::1]:8000",
                                             "qa.example.org:443"))
    assert not any(loopback.host_ok(h) for h in ("evil.example:8000", "127.0.0.1.evil.example", "", None))
    assert Access(None, host_names("127.0.0.1", ["*"])).host_ok("anything")
    assert strip_port("[::1]:8000") == "::1" and strip_port("Example.org:80") == "example.org"
    assert loopback.key_ok("Bearer s3cret") and loopback.key_ok("bearer s3cret")
    assert not any(loopback.key_ok(h) for h in (None, "", "s3cret", "Bearer", "Bearer s3cre", "Basic s3cret"))
    assert Access(None).key_ok(None)  # no key set: open
