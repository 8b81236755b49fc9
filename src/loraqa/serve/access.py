"""Who may use a server: an API key (``Authorization: Bearer KEY``), the Host names it answers to,
and the rule that a server reachable from other machines has a key.

The key comes from the environment (``LORAQA_API_KEY``) or a file (``--api-key-file``), never from
the command line, which ``ps`` shows to every user of the machine. The Host check stops DNS
rebinding: a web page that the user visits resolves its own name to 127.0.0.1 and would otherwise
reach a local server with the user's browser; its requests carry that foreign name as their Host.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

KEY_VARIABLE = "LORAQA_API_KEY"
ADMIN_VARIABLE = "LORAQA_ADMIN_KEY"  # loads and unloads adapters while serving (a key of its own)
WILDCARDS = ("0.0.0.0", "::", "")


def read_api_key(key_file: str | None, variable: str = KEY_VARIABLE, flag: str = "--api-key-file") -> str | None:
    """The key from ``key_file`` (its first line), else from ``variable``; None for neither."""
    if key_file:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ValueError(f"{flag} {key_file}: cannot read: {e.strerror}") from None
        if not key:
            raise ValueError(f"{flag} {key_file} is empty")
        return key
    key = os.environ.get(variable)
    if key is not None and not key.strip():
        raise ValueError(f"{variable} is set but empty")
    return key.strip() if key else None


def read_admin_key(key_file: str | None, api_key: str | None) -> str | None:
    """The admin key (``--admin-key-file`` or ``LORAQA_ADMIN_KEY``): another key than the API key,
    or the clients could load and unload adapters."""
    key = read_api_key(key_file, ADMIN_VARIABLE, "--admin-key-file")
    if key is not None and key == api_key:
        raise ValueError("the admin key must differ from the API key (every client holds that one)")
    return key


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, key: str | None, unauthenticated: bool) -> None:
    """Refuse to serve other machines without a key, unless the user said so with --unauthenticated."""
    if is_loopback(host) or key or unauthenticated:
        return
    raise ValueError(f"--host {host} lets other machines use the model, and no API key is set: put one in "
                     f"{KEY_VARIABLE} or a file given to --api-key-file (clients send 'Authorization: Bearer "
                     "KEY'), or pass --unauthenticated to serve anyone who can reach the port")


def host_names(host: str, allowed: list[str]) -> set[str]:
    """The Host header values (without port) a server bound to ``host`` answers to: the bound
    address, the loopback names for a loopback bind, this machine's names and addresses for a
    wildcard bind (0.0.0.0, ::), and ``allowed`` (``--allowed-host``; ``*`` allows any)."""
    names = {host.lower().strip("[]")} | {a.lower().strip("[]") for a in allowed}
    if is_loopback(host) or host in WILDCARDS:
        names |= {"localhost", "127.0.0.1", "::1"}
    if host in WILDCARDS:
        machine = {socket.gethostname(), socket.getfqdn()}
        for name in list(machine):
            try:
                machine |= {info[4][0] for info in socket.getaddrinfo(name, None)}
            except OSError:
                pass
        names |= {n.lower() for n in machine}
    return names


def strip_port(host_header: str) -> str:
    """``example.org:8000`` -> ``example.org``; ``[::1]:8000`` -> ``::1``."""
    value = host_header.strip().lower()
    if value.startswith("["):
        return value[1:value.index("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass
class Access:
    key: str | None = None
    hosts: set[str] = field(default_factory=lambda: {"*"})
    admin_key: str | None = None  # None: adapters cannot be loaded or unloaded while serving

    def host_ok(self, host_header: str | None) -> bool:
        return "*" in self.hosts or (host_header is not None and strip_port(host_header) in self.hosts)

    def key_ok(self, authorization: str | None) -> bool:
        """No key set, or ``Bearer KEY`` with the key, compared in constant time."""
        if self.key is None:
            return True
        return _bearer(authorization, self.key)

    def admin_ok(self, authorization: str | None) -> bool:
        """An admin key is set and ``Bearer ADMIN_KEY`` carries it."""
        return self.admin_key is not None and _bearer(authorization, self.admin_key)


def _bearer(authorization: str | None, key: str) -> bool:
    """``Bearer KEY`` with ``key``, compared in constant time."""
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())
