"""`loraqa serve`: answer questions over HTTP with the decoder `loraqa ask` uses.

    POST /answer  {"context": ..., "question": ...}       -> {"answer": ..., "no_answer": bool, "seconds": ...}
                  {"questions": [{"context", "question", "id"?}, ...]}
                                            -> {"answers": [{"id", "question", "answer", "no_answer"}, ...], "seconds": ...}

``no_answer`` is true when the model says the passage does not answer the question (the answer is
then ""; a model trained with unanswerable questions says so, see ``--allow-unanswerable``).
    GET  /health  {"status": "ok", ...}                   GET / a page to ask from

Requests that arrive together are decoded together: a :class:`Batcher` takes what is waiting
(at most ``max_batch_size`` questions, waiting at most ``max_wait_ms`` for more) and hands it to
``Answerer.decode``, the function ``ask`` calls, in one worker thread, so the event loop stays free
to take requests. Many users asking about one passage is the decoder's best case: the passage
is prefilled once for all of them. A question is decoded as it would be alone, so the answers are
``loraqa ask``'s for the same inputs and settings.

Bad requests get a 4xx and a one-line ``{"error": ...}``: 400 malformed JSON, 413 a body over
``MAX_BODY_BYTES``, 422 a missing, non-string or empty field, too many questions, or a passage
whose prompt does not fit the model's window. Unlike ``ask``, which cuts such a passage from the
end (and may cut the answer away), the server refuses it, so a user is never answered from half a
passage without knowing.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib.resources import files
from itertools import count

from loraqa.data.examples import Example
from loraqa.data.load import sample_file
from loraqa.data.squad import load_squad_file
from loraqa.inference.answerer import Answerer, load_answerer
from loraqa.inference.generate import stop_token_ids
from loraqa.io import log

MAX_BODY_BYTES = 1 << 20
DRAIN_FACTOR = 8
MAX_QUESTIONS = 256  # in one request; a request is never split across batches
PAGE = (files("loraqa.inference") / "page.html").read_text(encoding="utf-8")  # GET /: a page to ask from


class RequestError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def parse_questions(body: bytes) -> tuple[list[Example], bool]:
    """(examples, single) from a request body; ``RequestError`` naming the first problem."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise RequestError(400, f"body is not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(data, dict):
        raise RequestError(422, "body must be a JSON object with context and question, or questions")
    single = "questions" not in data
    rows = [data] if single else data["questions"]
    if not isinstance(rows, list) or not rows:
        raise RequestError(422, "questions must be a non-empty list of {context, question, id?} objects")
    if len(rows) > MAX_QUESTIONS:
        raise RequestError(422, f"at most {MAX_QUESTIONS} questions a request, got {len(rows)}")
    examples = []
    for n, row in enumerate(rows, 1):
        where = "" if single else f"questions[{n - 1}]: "
        if not isinstance(row, dict):
            raise RequestError(422, f"{where}must be an object with context and question")
        for key in ("context", "question"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise RequestError(422, f"{where}field '{key}' must be a non-empty string")
        if not isinstance(row.get("id", ""), (str, int)) or isinstance(row.get("id"), bool):
            raise RequestError(422, f"{where}field 'id' must be a string or an integer")
        examples.append(Example(str(row.get("id", n)), "", row["context"], row["question"], ()))
    return examples, single


class Batcher:
    """Groups concurrent requests into decoding batches; decodes in one worker thread."""

    def __init__(self, answerer: Answerer, max_batch_size: int = 32, max_wait_ms: float = 10.0) -> None:
        self.answerer, self.max_batch_size, self.max_wait = answerer, max_batch_size, max_wait_ms / 1000
        self.waiting: list[tuple[list, asyncio.Future, str]] = []  # (features, answers, passage), oldest first
        self.wake = asyncio.Event()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="loraqa-decode")  # torch runs here, one batch at a time
        self.ids = count()
        self.batches = self.questions = 0  # served so far (GET /health)
        self.contexts: dict[str, str] = {}  # feature id -> passage, while waiting or decoding

    async def answer(self, features: list, passage: str = "", contexts: list[str] | None = None) -> list[str]:
        """Answers for ``features``, in order, decoded with whatever else is waiting; ``contexts``
        (one per feature) hold the answers to their passages under ``--constrain-to-context``."""
        features = [replace(f, id=f"{next(self.ids)}") for f in features]  # request ids may clash
        self.contexts.update(zip((f.id for f in features), contexts or [passage] * len(features)))
        done = asyncio.get_running_loop().create_future()
        self.waiting.append((features, done, passage))
        self.wake.set()
        return await done

    def size(self) -> int:
        return sum(len(f) for f, *_ in self.waiting)

    def take(self) -> list[tuple[list, asyncio.Future, str]]:
        """The next batch: whole passages, oldest first, up to ``max_batch_size`` questions (a larger
        request goes alone). A passage split over two batches is prefilled twice, so the questions
        about the oldest request's passage go together even when others arrived in between."""
        order = list(dict.fromkeys(passage for *_, passage in self.waiting))
        batch, size = [], 0
        for passage in order:
            for item in [w for w in self.waiting if w[2] == passage]:
                if not batch or size + len(item[0]) <= self.max_batch_size:
                    batch.append(item)
                    size += len(item[0])
        taken = {id(item) for item in batch}
        self.waiting = [w for w in self.waiting if id(w) not in taken]
        return batch

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.waiting:
                self.wake.clear()
                await self.wake.wait()
            # a full batch goes at once; else wait a little for others (they queued while the last one decoded)
            deadline = loop.time() + self.max_wait
            while self.size() < self.max_batch_size and (left := deadline - loop.time()) > 0:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self.take()
            features = [f for fs, *_ in batch for f in fs]
            contexts = {f.id: self.contexts.pop(f.id) for f in features}
            try:
                answers = await loop.run_in_executor(self.worker, self.answerer.decode, features, contexts)
            except Exception as e:  # noqa: BLE001 - the requests fail, the server goes on
                for _, done, _ in batch:
                    if not done.done():
                        done.set_exception(e)
                continue
            self.batches, self.questions = self.batches + 1, self.questions + len(features)
            for fs, done, _ in batch:
                if not done.done():  # a client that went away cancelled its future
                    done.set_result([answers[f.id] for f in fs])

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)


def check_fits(answerer: Answerer, examples: list[Example], single: bool) -> list:
    """One feature per example; ``RequestError`` for a passage that does not fit uncut."""
    features = []
    for n, ex in enumerate(examples):
        got, stats = answerer.features([ex])
        if stats.windowed or stats.dropped:
            where = "" if single else f"questions[{n}]: "
            settings = answerer.settings
            budget = settings.max_length - settings.max_new_tokens
            raise RequestError(422, f"{where}passage too long: the prompt must fit in {budget} tokens "
                                    f"(the model's {settings.max_length} less {settings.max_new_tokens} "
                                    "for the answer); shorten the passage")
        features += got
    return features


async def read_body(request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body; ``RequestError`` 413 for one over ``limit`` bytes. The rest of an oversized body
    is read and dropped (up to ``DRAIN_FACTOR`` x ``limit``) so the client is still sending when
    the 413 comes and can read it; a larger one is cut off."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DRAIN_FACTOR * limit:
        raise RequestError(413, f"body over {limit} bytes")
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            body += chunk
        elif size > DRAIN_FACTOR * limit:
            break
    if size > limit:
        raise RequestError(413, f"body over {limit} bytes")
    return bytes(body)


def check_limits(max_batch_size: int, max_wait_ms: float, port: int = 0) -> None:
    if max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    if not max_wait_ms >= 0:
        raise ValueError(f"--max-wait-ms must be >= 0, got {max_wait_ms}")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")


def build_app(answerer: Answerer, max_batch_size: int = 32, max_wait_ms: float = 10.0):
    """The Starlette app: /answer, /health and the page, over one :class:`Batcher`."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    check_limits(max_batch_size, max_wait_ms)
    state = {}

    async def answer(request):
        start = time.perf_counter()
        try:
            body = await read_body(request)
            loop = asyncio.get_running_loop()
            examples, single = await loop.run_in_executor(state["parser"], parse_questions, body)
            features = await loop.run_in_executor(state["parser"], check_fits, answerer, examples, single)
        except RequestError as e:
            return JSONResponse({"error": e.reason}, status_code=e.status)
        try:
            answers = await state["batcher"].answer(features, examples[0].context, [ex.context for ex in examples])
        except Exception as e:  # noqa: BLE001 - one line, and the server goes on
            return JSONResponse({"error": f"decoding failed: {type(e).__name__}: {e}"}, status_code=500)
        seconds = round(time.perf_counter() - start, 4)
        if single:
            return JSONResponse({"answer": answers[0], "no_answer": not answers[0], "seconds": seconds})
        return JSONResponse({"answers": [{"id": ex.id, "question": ex.question, "answer": a, "no_answer": not a}
                                         for ex, a in zip(examples, answers)], "seconds": seconds})

    async def health(request):
        batcher = state["batcher"]
        return JSONResponse({"status": "ok", "model": answerer.name, "precision": answerer.precision,
                             "max_length": answerer.settings.max_length, "batches": batcher.batches,
                             "questions": batcher.questions, "waiting": batcher.size()})

    async def page(request):
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
          max_wait_ms: float = 10.0) -> None:
    """Load the model once, then serve until Ctrl-C."""
    import uvicorn

    check_limits(max_batch_size, max_wait_ms, port)  # before minutes of loading
    # a precision probe (where --precision auto needs one) runs on realistic prompts: the bundled sample's
    answerer = load_answerer(config, adapter, load_squad_file(sample_file("eval"))[:64])
    stop_token_ids(answerer.tokenizer)  # computed once, before the first request waits for it
    app = build_app(answerer, max_batch_size, max_wait_ms)
    log(f"serving {config.model}{' + ' + adapter if adapter else ''} on http://{host}:{port} "
        f"(batches of at most {max_batch_size} questions, {max_wait_ms:g} ms wait)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
