"""`loraqa serve`: answer questions over HTTP with the decoder `loraqa ask` uses.

    POST /answer  {"context": ..., "question": ..., "model"?: ...}
                          -> {"answer": ..., "no_answer": bool, "start": int|null, "end": int|null, "seconds": ...}
                  {"questions": [{"context", "question", "id"?}, ...], "model"?: ...}
                          -> {"answers": [{"id", "question", "answer", "no_answer", "start", "end"}, ...], "seconds"}
    GET  /v1/models, POST /v1/completions, POST /v1/chat/completions   OpenAI's API (inference.openai_api)
    POST /v1/load_lora_adapter {"lora_name", "lora_path"}, /v1/unload_lora_adapter {"lora_name"}   admin key
    GET  /metrics (Prometheus, inference.metrics)    GET /health    GET / a page to ask from

``no_answer`` is true when the model says the passage does not answer the question (the answer is
then ""); ``start`` and ``end`` are the answer's character offsets in the passage, where it is
found there (its first occurrence). ``model`` names a LoRA adapter or the base (``--adapter NAME=PATH``,
``GET /v1/models``); requests for different adapters are decoded in one batch (``model.adapters``).

Requests that arrive together are decoded together (``inference.batcher``), so the answers are
``loraqa ask``'s for the same inputs and settings. With an API key (``inference.access``), every
route but ``/health``, ``/`` and (unless ``--metrics-need-key``) ``/metrics`` needs
``Authorization: Bearer KEY``; loading and unloading adapters needs the admin key. Every route
answers only to the Host names the server is bound to or allowed (``--allowed-host``).

Bad requests get a 4xx and a one-line reason: 400 malformed JSON (or, on the OpenAI routes, a
request they do not serve, in OpenAI's error shape), 401 no or a wrong key, 404 an unknown model,
408 a body not received within ``request.READ_SECONDS``, 413 a body over ``MAX_BODY_BYTES`` or a
prompt over ``--max-prompt-tokens``, 415 a body not sent as application/json, 421 a foreign Host,
422 a missing, non-string or empty field, too many questions, or a passage whose prompt does not fit
the model's window; 504 a request not answered within ``--request-timeout``. A request that fails
inside a batch fails alone (the others are answered), with a 500 naming an id that the log's line
holds, never the exception's text. SIGTERM or Ctrl-C: no new connections, the requests in flight
are answered (for at most ``--request-timeout``), then the process exits 0.
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib.resources import files

from loraqa.data.examples import Example
from loraqa.data.load import sample_file
from loraqa.data.squad import load_squad_file
from loraqa.inference import openai_api
from loraqa.inference.access import Access, check_bind, host_names, read_admin_key, read_api_key
from loraqa.inference.answerer import Answerer, load_answerer
from loraqa.inference.batcher import Batcher, decoding_thread
from loraqa.inference.generate import stop_token_ids
from loraqa.inference.metrics import Metrics
from loraqa.inference.request import (MAX_PROMPT_TOKENS, RequestError, check_fits, drain, parse_json,
                                      parse_questions, prompt_feature, read_body)
from loraqa.io import log
from loraqa.model.adapters import read_adapter_flags
from loraqa.runtime import allocator

PAGE = (files("loraqa.inference") / "page.html").read_text(encoding="utf-8")  # GET /: a page to ask from


def check_limits(max_batch_size: int, max_wait_ms: float, port: int = 0, request_timeout: float = 60.0,
                 max_prompt_tokens: int = MAX_PROMPT_TOKENS) -> None:
    if not request_timeout > 0:
        raise ValueError(f"--request-timeout must be > 0 seconds, got {request_timeout}")
    if max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    if not max_wait_ms >= 0:
        raise ValueError(f"--max-wait-ms must be >= 0, got {max_wait_ms}")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    if max_prompt_tokens < 1:
        raise ValueError(f"--max-prompt-tokens must be >= 1, got {max_prompt_tokens}")


def refusal(request, access: Access, need: str) -> RequestError | None:
    """Why ``request`` is refused before its body is read: a foreign Host (421); then, by ``need``,
    no or a wrong key (401: "key" for the API, "admin" for loading adapters) and, on a POST, a body
    not declared as JSON (415)."""
    if not access.host_ok(request.headers.get("host")):
        return RequestError(421, f"Host {request.headers.get('host')!r} is not a name this server answers to "
                                 "(the server's --allowed-host adds one)")
    authorization = request.headers.get("authorization")
    if need == "key" and not access.key_ok(authorization):
        return RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'")
    if need == "admin" and not access.admin_ok(authorization):
        why = "no admin key is set (--admin-key-file)" if access.admin_key is None else "missing or wrong admin key"
        return RequestError(401, f"loading and unloading adapters needs the admin key: {why}")
    if request.method == "POST" and request.headers.get("content-type", "").split(";")[0].strip().lower() != \
            "application/json":
        return RequestError(415, "send the body as JSON, with the header 'Content-Type: application/json'")
    return None


def offsets(context: str, answer: str) -> tuple[int | None, int | None]:
    """The answer's character span in the passage (its first occurrence), or (None, None)."""
    start = context.find(answer) if answer else -1
    return (start, start + len(answer)) if start >= 0 else (None, None)


def build_app(answerer: Answerer, max_batch_size: int = 32, max_wait_ms: float = 10.0, access: Access | None = None,
              request_timeout: float = 60.0, max_prompt_tokens: int = MAX_PROMPT_TOKENS,
              metrics_need_key: bool = False, worker=None, mix_adapters: bool = True):
    """The Starlette app: /answer, the OpenAI routes, the admin routes, /metrics, /health and the
    page, over one :class:`Batcher` (decoding in ``worker``, the thread the model was loaded in)."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    check_limits(max_batch_size, max_wait_ms, request_timeout=request_timeout, max_prompt_tokens=max_prompt_tokens)
    access = access or Access()
    metrics = Metrics()
    state = {"admin": asyncio.Lock()}

    def models() -> list[str]:
        """What ``model`` may name: the base and each adapter (one merged model: its name alone)."""
        return [answerer.name] + (answerer.adapters.names if answerer.adapters is not None else [])

    def adapter_of(model: str | None) -> str | None:
        """The adapter a request names (None: the base, or the model as loaded)."""
        if model is None or model == answerer.name:
            return None
        if answerer.adapters is None or model not in answerer.adapters.names:
            raise RequestError(404, f"the model {model!r} does not exist here; GET /v1/models lists {', '.join(models())}")
        return model

    def error(e: RequestError, openai: bool = False) -> JSONResponse:
        metrics.status(e.status)
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
        if e.status in (408, 413):  # a body left unread: the connection cannot carry another request
            headers["Connection"] = "close"
        body = openai_api.OpenAIError(e.status, e.reason).body() if openai else {"error": e.reason}
        return JSONResponse(body, status_code=e.status, headers=headers)

    def failure(e: Exception, openai: bool = False) -> JSONResponse:
        """A 500 naming an id; the log line holds the exception (its text never reaches a client)."""
        rid = uuid.uuid4().hex[:12]
        log(f"request {rid} failed: {type(e).__name__}: {e}")
        return error(RequestError(500, f"the server failed to answer (request {rid}; its log says why)"), openai)

    async def body_of(request, need: str):
        if refused := refusal(request, access, need):
            await drain(request)  # a client still sending would see a reset, not the reason
            raise refused
        return await read_body(request)

    async def off_loop(work, *args):
        """Parsing and tokenising a body (up to 1 MB) run here: off the event loop, and off the decoder."""
        return await asyncio.get_running_loop().run_in_executor(state["parser"], work, *args)

    async def answer(request):
        start = time.perf_counter()
        try:
            examples, single, model = await off_loop(parse_questions, await body_of(request, "key"))
            adapter = adapter_of(model)
            features = await off_loop(check_fits, answerer, examples, single, max_prompt_tokens)
        except RequestError as e:
            return error(e)
        try:
            answers = await asyncio.wait_for(
                state["batcher"].answer(features, examples[0].context, [ex.context for ex in examples], adapter),
                request_timeout)
        except asyncio.TimeoutError:
            return error(RequestError(504, f"no answer within --request-timeout {request_timeout:g} s"))
        except RequestError as e:  # its adapter was unloaded while it waited
            return error(e)
        except Exception as e:  # noqa: BLE001 - one line, and the server goes on
            return failure(e)
        metrics.answers.inc(len(answers))
        metrics.latency.labels("/answer").observe(time.perf_counter() - start)
        seconds = round(time.perf_counter() - start, 4)
        rows = [{"answer": a, "no_answer": not a, **dict(zip(("start", "end"), offsets(ex.context, a)))}
                for ex, a in zip(examples, answers)]
        if single:
            return JSONResponse({**rows[0], "seconds": seconds})
        return JSONResponse({"answers": [{"id": ex.id, "question": ex.question, **row}
                                         for ex, row in zip(examples, rows)], "seconds": seconds})

    def prepare(body: bytes, chat: bool):
        """(the request, its one feature, its passage) for an OpenAI route's body."""
        request = openai_api.parse_completion(parse_json(body), chat, answerer.settings.template, models())
        if request.prompt is not None:
            return request, prompt_feature(answerer, request.prompt, max_prompt_tokens), ""
        example = Example("1", "", request.context, request.question, ())
        return request, check_fits(answerer, [example], True, max_prompt_tokens)[0], request.context

    async def completions(request, chat: bool):
        start = time.perf_counter()
        try:
            wanted, feature, passage = await off_loop(prepare, await body_of(request, "key"), chat)
            adapter = adapter_of(wanted.model)
        except RequestError as e:
            return error(e, openai=True)
        route = "/v1/chat/completions" if chat else "/v1/completions"
        if wanted.stream:
            return StreamingResponse(stream(wanted, feature, passage, adapter, start, route),
                                     media_type="text/event-stream")
        try:
            _, asked = await asyncio.wait_for(state["batcher"].ask([feature], passage, None, adapter), request_timeout)
        except asyncio.TimeoutError:
            return error(RequestError(504, f"no answer within --request-timeout {request_timeout:g} s"), openai=True)
        except RequestError as e:
            return error(e, openai=True)
        except Exception as e:  # noqa: BLE001
            return failure(e, openai=True)
        text, reason, made = openai_api.finish(answerer.tokenizer, asked.tokens[0], wanted,
                                               answerer.settings.max_new_tokens)
        metrics.answers.inc()
        metrics.latency.labels(route).observe(time.perf_counter() - start)
        return JSONResponse(openai_api.response(wanted, text, reason, openai_api.usage(feature.n_prompt, made)))

    async def stream(wanted, feature, passage: str, adapter, start: float, route: str):
        """Server-sent events: the answer's pieces as its tokens are decoded, then its end."""
        tokens: asyncio.Queue = asyncio.Queue()
        deltas = openai_api.Deltas(answerer.tokenizer, wanted)
        task = asyncio.ensure_future(state["batcher"].ask([feature], passage, None, adapter,
                                                          lambda n, token: tokens.put_nowait(token)))
        deadline = asyncio.get_running_loop().time() + request_timeout

        def event(data: dict) -> str:
            return f"data: {json.dumps(data)}\n\n"

        yield event(openai_api.chunk(wanted, "", first=True))
        try:
            while not (task.done() and tokens.empty()):
                try:
                    token = await asyncio.wait_for(tokens.get(), 0.05)
                except asyncio.TimeoutError:
                    if asyncio.get_running_loop().time() > deadline:
                        raise
                    continue
                if piece := deltas.push(token):
                    yield event(openai_api.chunk(wanted, piece))
            _, asked = task.result()
            text, reason, made = openai_api.finish(answerer.tokenizer, asked.tokens[0], wanted,
                                                   answerer.settings.max_new_tokens)
            if rest := deltas.rest(text):
                yield event(openai_api.chunk(wanted, rest))
            yield event(openai_api.chunk(wanted, reason=reason))
            if wanted.include_usage:
                yield event(openai_api.chunk(wanted, usage=openai_api.usage(feature.n_prompt, made)))
            metrics.answers.inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)
        except asyncio.TimeoutError:
            task.cancel()
            metrics.status(504)
            yield event(openai_api.OpenAIError(504, f"no answer within --request-timeout {request_timeout:g} s").body())
        except RequestError as e:
            metrics.status(e.status)
            yield event(openai_api.OpenAIError(e.status, e.reason).body())
        except Exception as e:  # noqa: BLE001 - the stream ends with an error event naming an id
            rid = uuid.uuid4().hex[:12]
            log(f"request {rid} failed: {type(e).__name__}: {e}")
            metrics.status(500)
            yield event(openai_api.OpenAIError(500, f"the server failed to answer (request {rid})").body())
        yield "data: [DONE]\n\n"

    async def list_models(request):
        if refused := refusal(request, access, "key"):
            return error(refused, openai=True)
        now = int(time.time())
        entries = (answerer.adapters.describe() if answerer.adapters is not None
                   else [{"id": answerer.name, "parent": None}])
        return JSONResponse({"object": "list", "data": [
            {"id": m["id"], "object": "model", "created": now, "owned_by": "loraqa", "root": m.get("path", m["id"]),
             "parent": m["parent"]} for m in entries]})

    async def load_adapter(request):
        try:
            body = await off_loop(parse_json, await body_of(request, "admin"))
            name, path = (body.get("lora_name"), body.get("lora_path")) if isinstance(body, dict) else (None, None)
            if not isinstance(name, str) or not isinstance(path, str):
                raise RequestError(400, "send {\"lora_name\": NAME, \"lora_path\": FOLDER}")
            if answerer.adapters is None:
                raise RequestError(400, "this server holds one merged model; start it with --adapter NAME=PATH "
                                        "or an admin key to load adapters")
            async with state["admin"]:
                try:  # read and checked off the decoding thread; attached between two batches
                    read = await asyncio.get_running_loop().run_in_executor(state["loader"], answerer.adapters.read,
                                                                            name, path)
                except ValueError as e:
                    raise RequestError(400, str(e)) from None
                await state["batcher"].between_batches(lambda: answerer.attach(read))
        except RequestError as e:
            return error(e)
        log(f"loaded adapter {name} from {path}")
        return JSONResponse({"status": "loaded", "lora_name": name, "models": models()})

    async def unload_adapter(request):
        try:
            body = await off_loop(parse_json, await body_of(request, "admin"))
            name = body.get("lora_name") if isinstance(body, dict) else None
            if answerer.adapters is None or name not in answerer.adapters.names:
                raise RequestError(404, f"no adapter {name!r} is loaded")
            async with state["admin"]:
                answerer.adapters.retire(name)  # no longer listed or routed to, from now on
                state["batcher"].drop_adapter(name, RequestError(404, f"the model {name!r} was unloaded"))
                await state["batcher"].between_batches(lambda: answerer.adapters.detach(name))
        except RequestError as e:
            return error(e)
        log(f"unloaded adapter {name}")
        return JSONResponse({"status": "unloaded", "lora_name": name, "models": models()})

    async def metrics_page(request):
        if refused := refusal(request, access, "key" if metrics_need_key else "open"):
            return error(refused)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def health(request):
        if refused := refusal(request, access, "open"):
            return error(refused)
        batcher = state["batcher"]
        return JSONResponse({"status": "ok", "model": answerer.name, "models": models(),
                             "precision": answerer.precision, "max_length": answerer.settings.max_length,
                             "batches": batcher.batches, "questions": batcher.questions, "waiting": batcher.size(),
                             "api_key": access.key is not None, "allocator": allocator()})

    async def page(request):
        if refused := refusal(request, access, "open"):
            return error(refused)
        return HTMLResponse(PAGE)

    @asynccontextmanager
    async def lifespan(app):
        state["batcher"] = Batcher(answerer, max_batch_size, max_wait_ms, worker, mix_adapters)
        metrics.watch(state["batcher"], answerer, max_batch_size)
        state["parser"] = ThreadPoolExecutor(1, thread_name_prefix="loraqa-parse")
        state["loader"] = ThreadPoolExecutor(1, thread_name_prefix="loraqa-load")  # adapters read from disk
        task = asyncio.create_task(state["batcher"].run())
        yield
        task.cancel()
        state["batcher"].close()
        for pool in ("parser", "loader"):
            state[pool].shutdown(wait=False, cancel_futures=True)

    return Starlette(routes=[
        Route("/answer", answer, methods=["POST"]),
        Route("/v1/completions", functools.partial(completions, chat=False), methods=["POST"]),
        Route("/v1/chat/completions", functools.partial(completions, chat=True), methods=["POST"]),
        Route("/v1/models", list_models),
        Route("/v1/load_lora_adapter", load_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload_adapter, methods=["POST"]),
        Route("/metrics", metrics_page), Route("/health", health), Route("/", page)], lifespan=lifespan)


def serve(config, adapters: list[str], host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 32,
          max_wait_ms: float = 10.0, api_key_file: str | None = None, allowed_hosts: list[str] | None = None,
          unauthenticated: bool = False, request_timeout: float = 60.0, max_prompt_tokens: int = MAX_PROMPT_TOKENS,
          admin_key_file: str | None = None, metrics_need_key: bool = False, mix_adapters: bool = True) -> None:
    """Load the model once, then serve until SIGTERM or Ctrl-C, which let the requests in flight
    finish. ``adapters``: ``--adapter`` values; one plain PATH is merged (today's single model),
    NAME=PATH ones (or an admin key, to load them later) stay unmerged and are served side by side."""
    import uvicorn

    check_limits(max_batch_size, max_wait_ms, port, request_timeout, max_prompt_tokens)  # before minutes of loading
    pairs = read_adapter_flags(adapters)
    key = read_api_key(api_key_file)
    admin = read_admin_key(admin_key_file, key)
    check_bind(host, key, unauthenticated)
    access = Access(key, host_names(host, allowed_hosts or []), admin)
    merged = pairs[0][1] if len(pairs) == 1 and pairs[0][0] is None and admin is None else None
    if merged is None and any(name is None for name, _ in pairs):
        raise ValueError("--adapter PATH alone is merged into the model; with an admin key, name it: --adapter NAME=PATH")
    named = None if merged is not None or (not pairs and admin is None) else pairs
    # loaded in the thread that will decode (batcher.decoding_thread: one OpenMP team, 30% faster on 2 cores);
    # a precision probe (where --precision auto needs one) runs on realistic prompts: the bundled sample's
    worker = decoding_thread()
    answerer = worker.submit(load_answerer, config, merged, load_squad_file(sample_file("eval"))[:64], named).result()
    stop_token_ids(answerer.tokenizer)  # computed once, before the first request waits for it
    app = build_app(answerer, max_batch_size, max_wait_ms, access, request_timeout, max_prompt_tokens, metrics_need_key,
                    worker, mix_adapters)
    served = f" + {merged}" if merged else (f"; adapters {', '.join(n for n, _ in named)}" if named else "")
    log(f"serving {config.model}{served} on http://{host}:{port} (batches of at most {max_batch_size} questions, "
        f"{max_wait_ms:g} ms wait; {'API key required' if key else 'no API key'}"
        f"{'; adapters loaded and unloaded with the admin key' if admin else ''}; Host: {', '.join(sorted(access.hosts))})")
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
