"""What every route of a server shares (:class:`Service`): the loaded model, the batcher in front of
it, who may ask, the limits, the metrics, and the few steps each route takes the same way: read a
body behind its checks, name the adapter a request asks, wait for its answer within the deadline,
and turn a refusal or a failure into a response."""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from loraqa.inference.answerer import Answerer
from loraqa.inference.documents import gather, windows_of
from loraqa.io import log
from loraqa.model.passage_store import PassageStore
from loraqa.serve import openai_api
from loraqa.serve.access import Access
from loraqa.serve.batcher import Ask, Batcher
from loraqa.serve.metrics import Metrics
from loraqa.serve.request import (DRAIN_SECONDS, MAX_DOCUMENT_TOKENS, MAX_PROMPT_TOKENS, RequestError, check_fits,
                                  drain, read_body)


@dataclass(frozen=True)
class Limits:
    """How much one server takes on: batches, waits, deadlines and prompt sizes (the serve flags)."""

    max_batch_size: int = 32
    max_wait_ms: float = 10.0
    request_timeout: float = 60.0
    max_prompt_tokens: int = MAX_PROMPT_TOKENS      # one prompt: a question with its passage, or with a window of it
    max_document_tokens: int = MAX_DOCUMENT_TOKENS  # one passage, read in windows where it is long
    document_cache_mb: int = 1024  # documents' windows' keys and values kept across requests (0: none)
    read_ahead: bool = True        # a document's other windows read while no request waits

    def check(self, port: int = 0) -> None:
        """``ValueError`` naming the first flag out of range."""
        if not self.request_timeout > 0:
            raise ValueError(f"--request-timeout must be > 0 seconds, got {self.request_timeout}")
        if self.max_batch_size < 1:
            raise ValueError(f"--max-batch-size must be >= 1, got {self.max_batch_size}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if not 0 <= port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {port}")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"--max-prompt-tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.max_document_tokens < 1:
            raise ValueError(f"--max-document-tokens must be >= 1, got {self.max_document_tokens}")
        if self.document_cache_mb < 0:
            raise ValueError(f"--document-cache-mb must be >= 0, got {self.document_cache_mb}")


class Service:
    """A server's shared state; the batcher and the pools start with the app (:meth:`start`)."""

    def __init__(self, answerer: Answerer, limits: Limits, access: Access, metrics_need_key: bool = False,
                 worker: ThreadPoolExecutor | None = None, mix_adapters: bool = True,
                 adapter_root: str | None = None) -> None:
        self.answerer, self.limits, self.access = answerer, limits, access
        self.metrics_need_key, self.adapter_root = metrics_need_key, adapter_root
        self.metrics = Metrics()
        if limits.document_cache_mb and answerer.passages is None:  # a second question about a document reads
            answerer.passages = PassageStore(limits.document_cache_mb << 20)  # its windows from here
        self.admin = asyncio.Lock()
        self.forms_seen: set[str] = set()
        self._worker, self._mix = worker, mix_adapters
        self.batcher: Batcher | None = None
        self.parser = self.loader = None

    def start(self) -> asyncio.Task:
        self.batcher = Batcher(self.answerer, self.limits.max_batch_size, self.limits.max_wait_ms, self._worker,
                               self._mix)
        self.metrics.watch(self.batcher, self.answerer, self.limits.max_batch_size)
        self.parser = ThreadPoolExecutor(1, thread_name_prefix="loraqa-parse")
        self.loader = ThreadPoolExecutor(1, thread_name_prefix="loraqa-load")  # adapters read from disk
        return asyncio.create_task(self.batcher.run())

    def stop(self) -> None:
        self.batcher.close()
        for pool in (self.parser, self.loader):
            pool.shutdown(wait=False, cancel_futures=True)

    def models(self) -> list[str]:
        """What ``model`` may name: the base and each adapter (one merged model: its name alone)."""
        adapters = self.answerer.adapters
        return [self.answerer.name] + (adapters.names if adapters is not None else [])

    def adapter_of(self, model: str | None) -> str | None:
        """The handle of the adapter a request names, fixed as it is admitted (None: the base, or the
        model as loaded); 404 for a name not served."""
        adapters = self.answerer.adapters
        if model is None or model == self.answerer.name:
            return None
        try:
            if adapters is None:
                raise KeyError(model)
            return adapters.handle(model)
        except KeyError:
            raise RequestError(404, f"the model {model!r} does not exist here; GET /v1/models lists "
                                    f"{', '.join(self.models())}") from None

    def refusal(self, request, need: str) -> RequestError | None:
        """Why ``request`` is refused before its body is read: a foreign Host (421); then, by ``need``,
        no or a wrong key (401: "key" for the API, "admin" for loading adapters) and, on a POST, a body
        not declared as JSON (415)."""
        access = self.access
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

    async def body_of(self, request, need: str) -> bytes:
        """The body of a request that passes :meth:`refusal`. A refused one's body is read and dropped
        for at most ``DRAIN_SECONDS`` (a client still sending would see a reset, not the reason), and
        the connection then closes: a client that announces a body and sends nothing holds nothing."""
        if refused := self.refusal(request, need):
            try:
                await asyncio.wait_for(drain(request), DRAIN_SECONDS)
            except asyncio.TimeoutError:
                pass
            refused.close = True
            raise refused
        return await read_body(request)

    async def off_loop(self, work, *args):
        """Parsing and tokenising a body (up to 1 MB) run here: off the event loop, and off the decoder."""
        return await asyncio.get_running_loop().run_in_executor(self.parser, work, *args)

    def fits(self, examples: list, single: bool):
        """(the plan, the features) of a request's questions, a long passage's in its windows (``check_fits``)."""
        return check_fits(self.answerer, examples, single, self.limits.max_prompt_tokens,
                          self.limits.max_document_tokens)

    async def read(self, examples: list, single: bool, adapter: str | None):
        """(what was read: answers, no-answer probabilities and, for long passages, sources; the plan;
        the request's ``Ask``) for a request's questions, each long passage in its windows."""
        asked, features = await self.off_loop(self.fits, examples, single)
        answers, item = await self.decoded(features, examples[0].context, [ex.context for ex in asked.asked], adapter,
                                           asked=asked)
        return self.gathered(asked, answers, item), asked, item

    def gathered(self, asked, answers: list[str], item: Ask):
        """``inference.documents.gather`` of a request's answers and no-answer probabilities, which
        come in the order of the plan's questions."""
        ids = [ex.id for ex in asked.asked]
        return gather(asked, dict(zip(ids, answers)), dict(zip(ids, item.na_probs)), self.answerer.settings)

    async def decoded(self, features: list, passage: str, contexts: list[str] | None, adapter: str | None,
                      on_token=None, asked=None) -> tuple[list[str], Ask]:
        """(answers, the request's ``Ask``) within ``--request-timeout`` (else a 504). The windows of
        the ``asked`` plan's long passages are then read ahead (``Batcher.read_ahead``)."""
        try:
            done = await asyncio.wait_for(self.batcher.ask(features, passage, contexts, adapter, on_token),
                                          self.limits.request_timeout)
        except asyncio.TimeoutError:
            raise self.timed_out() from None
        if asked is not None and asked.long and self.answerer.passages is not None and self.limits.read_ahead:
            self.batcher.read_ahead(adapter, windows_of(asked))
        return done

    def timed_out(self) -> RequestError:
        return RequestError(504, f"no answer within --request-timeout {self.limits.request_timeout:g} s")

    def respond(self, e: Exception, openai: bool = False):
        """The response for a refusal (its status and reason) or a failure (a 500 naming an id that the
        log's line holds with the exception; its text never reaches a client)."""
        from starlette.responses import JSONResponse

        if not isinstance(e, RequestError):
            e = self.failed(e)
        self.metrics.status(e.status)
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
        if e.status in (408, 413) or getattr(e, "close", False):  # a body left unread: the connection goes
            headers["Connection"] = "close"
        body = openai_api.error_body(e.status, e.reason, getattr(e, "param", None)) if openai else {"error": e.reason}
        return JSONResponse(body, status_code=e.status, headers=headers)

    @staticmethod
    def failed(e: Exception) -> RequestError:
        rid = uuid.uuid4().hex[:12]
        log(f"request {rid} failed: {type(e).__name__}: {e}")
        return RequestError(500, f"the server failed to answer (request {rid}; its log says why)")

    def read_as(self, form: str) -> None:
        """Count the shape a request's passage and question were read from; the log says each the first time."""
        if form not in self.forms_seen:
            self.forms_seen.add(form)
            log(f"an OpenAI-route request read as: {form} (later ones of this shape: loraqa_request_forms_total)")
        self.metrics.forms.labels(form).inc()

    def answered(self, route: str, start: float, questions: int = 1) -> None:
        self.metrics.answers.inc(questions)
        self.metrics.latency.labels(route).observe(time.perf_counter() - start)
