"""`loraqa serve`: answer questions over HTTP with the decoder `loraqa ask` uses.

    POST /answer  {"context": ..., "question": ...}       -> {"answer": ..., "no_answer": bool, "seconds": ...}
                  {"questions": [{"context", "question", "id"?}, ...]}
                                            -> {"answers": [{"id", "question", "answer", "no_answer"}, ...], "seconds": ...}
    GET  /health  {"status": "ok", ...}                   GET / a page to ask from

``no_answer`` is true when the model says the passage does not answer the question (the answer is
then ""; a model trained with unanswerable questions says so, see ``--allow-unanswerable``).

Requests that arrive together are decoded together (``inference.batcher``), so the answers are
``loraqa ask``'s for the same inputs and settings. With an API key (``inference.access``),
``POST /answer`` needs ``Authorization: Bearer KEY``; ``/health`` stays open. Every route answers
only to the Host names the server is bound to or allowed (``--allowed-host``).

Bad requests get a 4xx and a one-line ``{"error": ...}``: 400 malformed JSON, 401 no or a wrong
key, 413 a body over ``MAX_BODY_BYTES`` (of any size), 415 a body not sent as application/json (a
cross-site form cannot post one), 421 a foreign Host, 422 a missing, non-string or empty field, too
many questions, or a passage whose prompt does not fit the model's window (unlike ``ask``, which
cuts it, so nobody is answered from half a passage without knowing); 504 a request not answered
within ``--request-timeout``. SIGTERM or Ctrl-C: no new connections, the requests in flight are
answered (for at most ``--request-timeout``), then the process exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib.resources import files

from loraqa.data.load import sample_file
from loraqa.data.squad import load_squad_file
from loraqa.inference.access import Access, check_bind, host_names, read_api_key
from loraqa.inference.answerer import Answerer, load_answerer
from loraqa.inference.batcher import Batcher
from loraqa.inference.generate import stop_token_ids
from loraqa.inference.request import RequestError, check_fits, drain, parse_questions, read_body
from loraqa.io import log

PAGE = (files("loraqa.inference") / "page.html").read_text(encoding="utf-8")  # GET /: a page to ask from


def check_limits(max_batch_size: int, max_wait_ms: float, port: int = 0, request_timeout: float = 60.0) -> None:
    if not request_timeout > 0:
        raise ValueError(f"--request-timeout must be > 0 seconds, got {request_timeout}")
    if max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    if not max_wait_ms >= 0:
        raise ValueError(f"--max-wait-ms must be >= 0, got {max_wait_ms}")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")


def refusal(request, access: Access, answer_route: bool) -> RequestError | None:
    """Why ``request`` is refused before its body is read: a foreign Host (421); on POST /answer also
    no or a wrong key (401) and a body not declared as JSON (415)."""
    if not access.host_ok(request.headers.get("host")):
        return RequestError(421, f"Host {request.headers.get('host')!r} is not a name this server answers to "
                                 "(the server's --allowed-host adds one)")
    if answer_route and not access.key_ok(request.headers.get("authorization")):
        return RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'")
    if answer_route and request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return RequestError(415, "send the body as JSON, with the header 'Content-Type: application/json'")
    return None


def build_app(answerer: Answerer, max_batch_size: int = 32, max_wait_ms: float = 10.0, access: Access | None = None,
              request_timeout: float = 60.0):
    """The Starlette app: /answer, /health and the page, over one :class:`Batcher`."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    check_limits(max_batch_size, max_wait_ms, request_timeout=request_timeout)
    access = access or Access()
    state = {}

    def error(e: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse({"error": e.reason}, status_code=e.status, headers=headers)

    async def answer(request):
        start = time.perf_counter()
        try:
            if refused := refusal(request, access, answer_route=True):
                await drain(request)  # a client still sending would see a reset, not the reason
                raise refused
            body = await read_body(request)
            loop = asyncio.get_running_loop()
            examples, single = await loop.run_in_executor(state["parser"], parse_questions, body)
            features = await loop.run_in_executor(state["parser"], check_fits, answerer, examples, single)
        except RequestError as e:
            return error(e)
        try:
            answers = await asyncio.wait_for(
                state["batcher"].answer(features, examples[0].context, [ex.context for ex in examples]),
                request_timeout)
        except asyncio.TimeoutError:
            return error(RequestError(504, f"no answer within --request-timeout {request_timeout:g} s"))
        except Exception as e:  # noqa: BLE001 - one line, and the server goes on
            return JSONResponse({"error": f"decoding failed: {type(e).__name__}: {e}"}, status_code=500)
        seconds = round(time.perf_counter() - start, 4)
        if single:
            return JSONResponse({"answer": answers[0], "no_answer": not answers[0], "seconds": seconds})
        return JSONResponse({"answers": [{"id": ex.id, "question": ex.question, "answer": a, "no_answer": not a}
                                         for ex, a in zip(examples, answers)], "seconds": seconds})

    async def health(request):
        if refused := refusal(request, access, answer_route=False):
            return error(refused)
        batcher = state["batcher"]
        return JSONResponse({"status": "ok", "model": answerer.name, "precision": answerer.precision,
                             "max_length": answerer.settings.max_length, "batches": batcher.batches,
                             "questions": batcher.questions, "waiting": batcher.size(),
                             "api_key": access.key is not None})

    async def page(request):
        if refused := refusal(request, access, answer_route=False):
            return error(refused)
        return HTMLResponse(PAGE)

    @asynccontextmanager
    async def lifespan(app):
        state["batcher"] = Batcher(answerer, max_batch_size, max_wait_ms)
        # parsing and tokenising a body (up to 1 MB) run here: off the event loop, and off the decoder
        state["parser"] = ThreadPoolExecutor(1, thread_name_prefix="loraqa-parse")
        task = asyncio.create_task(state["batcher"].run())
        yield
        task.cancel()
        state["batcher"].close()
        state["parser"].shutdown(wait=False, cancel_futures=True)

    return Starlette(routes=[Route("/answer", answer, methods=["POST"]), Route("/health", health),
                             Route("/", page)], lifespan=lifespan)


def serve(config, adapter: str | None, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 32,
          max_wait_ms: float = 10.0, api_key_file: str | None = None, allowed_hosts: list[str] | None = None,
          unauthenticated: bool = False, request_timeout: float = 60.0) -> None:
    """Load the model once, then serve until SIGTERM or Ctrl-C, which let the requests in flight finish."""
    import uvicorn

    check_limits(max_batch_size, max_wait_ms, port, request_timeout)  # before minutes of loading
    key = read_api_key(api_key_file)
    check_bind(host, key, unauthenticated)
    access = Access(key, host_names(host, allowed_hosts or []))
    # a precision probe (where --precision auto needs one) runs on realistic prompts: the bundled sample's
    answerer = load_answerer(config, adapter, load_squad_file(sample_file("eval"))[:64])
    stop_token_ids(answerer.tokenizer)  # computed once, before the first request waits for it
    app = build_app(answerer, max_batch_size, max_wait_ms, access, request_timeout)
    log(f"serving {config.model}{' + ' + adapter if adapter else ''} on http://{host}:{port} "
        f"(batches of at most {max_batch_size} questions, {max_wait_ms:g} ms wait; "
        f"{'API key required' if key else 'no API key'}; Host: {', '.join(sorted(access.hosts))})")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=request_timeout))
    # uvicorn handles SIGTERM / SIGINT (stop accepting, finish what is in flight), then raises the
    # signal again for the handler it found: these, so the process ends with exit code 0
    stopped = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stopped.append(signum))
    server.run()
    if not server.started:  # uvicorn said why (e.g. the port is in use)
        raise ValueError(f"could not serve on {host}:{port}")
    log(f"stopped ({signal.Signals(stopped[0]).name})" if stopped else "stopped")
