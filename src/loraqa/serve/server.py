"""`loraqa serve`: load the model once, then answer over HTTP (``serve.app``) with the decoder
`loraqa ask` uses, until SIGTERM or Ctrl-C.

Requests that arrive together are decoded together (``serve.batcher``), so the answers are
``loraqa ask``'s for the same inputs and settings. ``model`` in a request names a LoRA adapter or the
base (``--adapter NAME=PATH``, ``GET /v1/models``); requests for different adapters are decoded in
one batch (``model.adapters``). SIGTERM or Ctrl-C: no new connections, the requests in flight are
answered (for at most ``--request-timeout``), then the process exits 0.
"""

from __future__ import annotations

import signal

from loraqa.data.load import sample_file
from loraqa.data.squad import load_squad_file
from loraqa.inference.answerer import load_answerer
from loraqa.inference.generate import stop_token_ids
from loraqa.io import log
from loraqa.model.adapters import COMPARED, prompt_mismatch, read_adapter_flags
from loraqa.serve.access import Access, check_bind, host_names, read_admin_key, read_api_key
from loraqa.serve.app import build_app
from loraqa.serve.batcher import decoding_thread
from loraqa.serve.service import Limits


def served_adapters(config, adapters: list[str], admin: str | None):
    """(the adapter merged into the model or None, the named ones or None) from ``--adapter`` values:
    one plain PATH is merged (a single model), NAME=PATH ones (or an admin key, to load them later)
    stay unmerged and are served side by side. Each must have been trained in the prompt settings
    the server answers with (a flag such as ``--template`` may not change them under it)."""
    pairs = read_adapter_flags(adapters)
    merged = pairs[0][1] if len(pairs) == 1 and pairs[0][0] is None and admin is None else None
    if merged is None and any(name is None for name, _ in pairs):
        raise ValueError("--adapter PATH alone is merged into the model; with an admin key, name it: --adapter NAME=PATH")
    settings = {k: getattr(config, k) for k in COMPARED}
    for name, path in pairs:
        if differ := prompt_mismatch(settings, path):
            raise ValueError(f"--adapter {name + '=' if name else ''}{path}: trained with other prompt settings than "
                             f"this server answers with ({differ}); serve it with a server of its own")
    return merged, None if merged is not None or (not pairs and admin is None) else pairs


def serve(config, adapters: list[str], host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
          api_key_file: str | None = None, allowed_hosts: list[str] | None = None, unauthenticated: bool = False,
          admin_key_file: str | None = None, metrics_need_key: bool = False, mix_adapters: bool = True,
          adapter_root: str | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C, which let the requests in flight finish."""
    import uvicorn

    limits = limits or Limits()
    limits.check(port)  # before minutes of loading
    key = read_api_key(api_key_file)
    admin = read_admin_key(admin_key_file, key)
    check_bind(host, key, unauthenticated)
    access = Access(key, host_names(host, allowed_hosts or []), admin)
    merged, named = served_adapters(config, adapters, admin)
    # loaded in the thread that will decode (batcher.decoding_thread: one OpenMP team, 30% faster on 2 cores);
    # a precision probe (where --precision auto needs one) runs on realistic prompts: the bundled sample's
    worker = decoding_thread()
    answerer = worker.submit(load_answerer, config, merged, load_squad_file(sample_file("eval"))[:64], named).result()
    stop_token_ids(answerer.tokenizer)  # computed once, before the first request waits for it
    app = build_app(answerer, limits, access, metrics_need_key, worker, mix_adapters, adapter_root)
    served = f" + {merged}" if merged else (f"; adapters {', '.join(n for n, _ in named)}" if named else "")
    log(f"serving {config.model}{served} on http://{host}:{port} (batches of at most {limits.max_batch_size} "
        f"questions, {limits.max_wait_ms:g} ms wait; {'API key required' if key else 'no API key'}"
        f"{'; adapters loaded and unloaded with the admin key' if admin else ''}; Host: {', '.join(sorted(access.hosts))})")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=limits.request_timeout))
    # uvicorn handles SIGTERM / SIGINT (stop accepting, finish what is in flight), then raises the
    # signal again for the handler it found: these, so the process ends with exit code 0
    stopped = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stopped.append(signum))
    server.run()
    if not server.started:  # uvicorn said why (e.g. the port is in use)
        raise ValueError(f"could not serve on {host}:{port}")
    log(f"stopped ({signal.Signals(stopped[0]).name})" if stopped else "stopped")
