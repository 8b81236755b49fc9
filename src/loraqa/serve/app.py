"""The Starlette app of ``loraqa serve``: its routes, wired to one :class:`~loraqa.serve.service.Service`.

    POST /answer                                   serve.answers
    GET  /v1/models, /v1/models/{id}               serve.openai_routes (OpenAI's API)
    POST /v1/completions, /v1/chat/completions
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter   serve.admin (the admin key)
    GET  /metrics (Prometheus, serve.metrics)    GET /health    GET / a page to ask from

With an API key (``serve.access``), every route but ``/health``, ``/`` and (unless
``--metrics-need-key``) ``/metrics`` needs ``Authorization: Bearer KEY``. Every route answers only
to the Host names the server is bound to or allowed (``--allowed-host``).

Bad requests get a 4xx and a one-line reason: 400 malformed JSON (or, on the OpenAI routes, a
request they do not serve, in OpenAI's error shape, naming the parameter), 401 no or a wrong key,
403 an adapter folder outside ``--adapter-root``, 404 an unknown model (or one unloaded before its
request was decoded), 408 a body not received within ``request.READ_SECONDS``, 413 a body over
``MAX_BODY_BYTES`` or a prompt over ``--max-prompt-tokens``, 415 a body not sent as
application/json, 421 a foreign Host, 422 a missing, non-string or empty field, too many
questions, or a passage whose prompt does not fit the model's window; 504 a request not answered
within ``--request-timeout``. Whatever else fails, fails alone: a 500 naming an id that the log's
line holds, never the exception's text, and counted in ``/metrics``.
"""

from __future__ import annotations

import functools
from contextlib import asynccontextmanager
from importlib.resources import files

from loraqa.runtime import allocator
from loraqa.serve import admin, answers, openai_routes
from loraqa.serve.access import Access
from loraqa.serve.service import Limits, Service

PAGE = (files("loraqa.serve") / "page.html").read_text(encoding="utf-8")  # GET /: a page to ask from


async def metrics_page(service: Service, request):
    from starlette.responses import Response

    if refused := service.refusal(request, "key" if service.metrics_need_key else "open"):
        return service.respond(refused)
    body, content_type = service.metrics.render()
    return Response(body, media_type=content_type)


async def health(service: Service, request):
    from starlette.responses import JSONResponse

    if refused := service.refusal(request, "open"):
        return service.respond(refused)
    answerer, batcher = service.answerer, service.batcher
    return JSONResponse({"status": "ok", "model": answerer.name, "models": service.models(),
                         "precision": answerer.precision, "max_length": answerer.settings.max_length,
                         "batches": batcher.batches, "questions": batcher.questions, "waiting": batcher.size(),
                         "api_key": service.access.key is not None, "allocator": allocator()})


async def page(service: Service, request):
    from starlette.responses import HTMLResponse

    if refused := service.refusal(request, "open"):
        return service.respond(refused)
    return HTMLResponse(PAGE)


def build_app(answerer, limits: Limits | None = None, access: Access | None = None, metrics_need_key: bool = False,
              worker=None, mix_adapters: bool = True, adapter_root: str | None = None):
    """The app over one batcher (decoding in ``worker``, the thread the model was loaded in)."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    limits = limits or Limits()
    limits.check()
    service = Service(answerer, limits, access or Access(), metrics_need_key, worker, mix_adapters, adapter_root)

    @asynccontextmanager
    async def lifespan(app):
        task = service.start()
        yield
        task.cancel()
        service.stop()

    def route(path: str, handler, methods=("GET",), **kwargs) -> Route:
        return Route(path, functools.partial(handler, service, **kwargs), methods=list(methods))

    async def unhandled(request, e: Exception):  # whatever a route did not expect: a counted 500 with an id
        return service.respond(e)

    return Starlette(routes=[
        route("/answer", answers.answer, ["POST"]),
        route("/v1/completions", openai_routes.completions, ["POST"], chat=False),
        route("/v1/chat/completions", openai_routes.completions, ["POST"], chat=True),
        route("/v1/models", openai_routes.list_models),
        route("/v1/models/{model:path}", openai_routes.get_model),
        route("/v1/load_lora_adapter", admin.load_adapter, ["POST"]),
        route("/v1/unload_lora_adapter", admin.unload_adapter, ["POST"]),
        route("/metrics", metrics_page), route("/health", health), route("/", page)],
        lifespan=lifespan, exception_handlers={Exception: unhandled})
