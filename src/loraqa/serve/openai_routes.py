"""OpenAI's routes over the batcher: ``POST /v1/completions`` and ``/v1/chat/completions`` (plain
or streamed as server-sent events), ``GET /v1/models`` and ``/v1/models/{id}``. What a request may
ask and the shapes that come back: ``serve.openai_api``. The answer is ``/answer``'s for the same
passage and question."""

from __future__ import annotations

import asyncio
import json
import time

from loraqa.data.examples import Example
from loraqa.data.prompt import cut_answer
from loraqa.serve import openai_api
from loraqa.inference.documents import SEP
from loraqa.serve.request import RequestError, parse_json, prompt_feature
from loraqa.serve.service import Service


def prepare(service: Service, body: bytes, chat: bool):
    """(the request, its plan or None, its features, its passages) for an OpenAI route's body. A raw
    prompt (a completion not in the template's form) is asked as it stands and is its own passage:
    ``--constrain-to-context`` holds its answer to a span of it. A passage and question are asked as
    ``/answer`` asks them (a long passage in its windows)."""
    answerer = service.answerer
    request = openai_api.parse_completion(parse_json(body), chat, answerer.settings.template, service.models(),
                                          answerer.settings.max_new_tokens)
    if request.prompt is not None:
        return request, None, [prompt_feature(answerer, request.prompt, service.limits.max_prompt_tokens)], \
            [request.prompt]
    asked, features = service.fits([Example("1", "", request.context, request.question, ())], True)
    return request, asked, features, [ex.context for ex in asked.asked]


def finished(service: Service, wanted, asked, features, answers: list[str], item) -> tuple[str, str, int, int]:
    """(answer, finish_reason, tokens decoded, prompt tokens): ``/answer``'s answer, and for a passage
    read in windows the chosen window's tokens."""
    at = 0
    if asked is not None and asked.long:
        done = service.gathered(asked, answers, item)
        at = [ex.id for ex in asked.asked].index(f"1{SEP}{done.sources['1'].window}")
        answers = [done.answers["1"] if i == at else a for i, a in enumerate(answers)]
    text, reason, made = openai_api.finish(service.answerer.tokenizer, item.tokens[at], answers[at], wanted,
                                           service.answerer.settings.max_new_tokens)
    if wanted.existing is not None and not text:  # LlamaIndex's refine: "if the context isn't useful, return the original"
        text = wanted.existing
    return text, reason, made, features[at].n_prompt


async def completions(service: Service, request, chat: bool):
    from starlette.responses import JSONResponse, StreamingResponse

    start = time.perf_counter()
    route = "/v1/chat/completions" if chat else "/v1/completions"
    try:
        wanted, asked, features, contexts = await service.off_loop(prepare, service,
                                                                   await service.body_of(request, "key"), chat)
        adapter = service.adapter_of(wanted.model)
        service.read_as(wanted.form if wanted.prompt is None else "raw prompt")
        if wanted.stream:
            return StreamingResponse(stream(service, wanted, asked, features, contexts, adapter, start, route),
                                     media_type="text/event-stream")
        answers, item = await service.decoded(features, contexts[0], contexts, adapter, asked=asked)
    except Exception as e:  # noqa: BLE001 - a refusal, or a failure named by an id
        return service.respond(e, openai=True)
    text, reason, made, prompt = finished(service, wanted, asked, features, answers, item)
    service.answered(route, start)
    return JSONResponse(openai_api.response(wanted, text, reason, openai_api.usage(prompt, made)))


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def stream(service: Service, wanted, asked, features, contexts: list[str], adapter, start: float, route: str):
    """Server-sent events: the answer's pieces as its tokens are decoded, then its end. A client that
    goes away cancels its question, whose row then leaves the batch at its next token. A passage read
    in windows sends its answer whole once one is chosen."""
    settings = service.answerer.settings
    tokens: asyncio.Queue = asyncio.Queue()
    windows = len(features) > 1
    deltas = openai_api.Deltas(service.answerer.tokenizer, wanted, cut_answer(settings.no_answer_text),
                               hold=windows or settings.na_prob_thresh is not None)
    task = asyncio.ensure_future(service.decoded(features, contexts[0], contexts, adapter,
                                                 None if windows else lambda n, token: tokens.put_nowait(token),
                                                 asked=asked))
    try:
        yield _event(openai_api.chunk(wanted, "", first=True))
        while not (task.done() and tokens.empty()):
            try:
                token = await asyncio.wait_for(tokens.get(), 0.05)
            except asyncio.TimeoutError:
                continue
            if piece := deltas.push(token):
                yield _event(openai_api.chunk(wanted, piece))
        answers, item = task.result()
        text, reason, made, prompt = finished(service, wanted, asked, features, answers, item)
        if rest := deltas.rest(text):
            yield _event(openai_api.chunk(wanted, rest))
        yield _event(openai_api.chunk(wanted, reason=reason))
        if wanted.include_usage:
            yield _event(openai_api.chunk(wanted, usage=openai_api.usage(prompt, made)))
        service.answered(route, start)
    except Exception as e:  # noqa: BLE001 - the stream ends with an error event (a 504, or a 500 naming an id)
        failed = e if isinstance(e, RequestError) else service.failed(e)
        service.metrics.status(failed.status)
        yield _event(openai_api.error_body(failed.status, failed.reason))
    finally:  # the client is gone (the generator closed), or the answer is out: nothing left to decode
        task.cancel()
    yield "data: [DONE]\n\n"


def _entry(model: dict, created: int) -> dict:
    return {"id": model["id"], "object": "model", "created": created, "owned_by": "loraqa", "root": model["id"],
            "parent": model["parent"]}


def _described(service: Service) -> list[dict]:
    adapters = service.answerer.adapters
    return adapters.describe() if adapters is not None else [{"id": service.answerer.name, "parent": None}]


async def list_models(service: Service, request):
    from starlette.responses import JSONResponse

    if refused := service.refusal(request, "key"):
        return service.respond(refused, openai=True)
    now = int(time.time())
    return JSONResponse({"object": "list", "data": [_entry(m, now) for m in _described(service)]})


async def get_model(service: Service, request):
    from starlette.responses import JSONResponse

    if refused := service.refusal(request, "key"):
        return service.respond(refused, openai=True)
    wanted = request.path_params["model"]
    found = next((m for m in _described(service) if m["id"] == wanted), None)
    if found is None:
        return service.respond(RequestError(404, f"the model {wanted!r} does not exist here; GET /v1/models lists "
                                                 f"{', '.join(service.models())}"), openai=True)
    return JSONResponse(_entry(found, int(time.time())))
