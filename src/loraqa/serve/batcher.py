"""Concurrent requests decoded together: the server's queue in front of ``Answerer.decode``.

Requests for different LoRA adapters share a batch (``model.adapters``): a passage's questions go
together for one adapter at a time (their prefill is shared), and the batch takes them oldest
first whatever their adapter. A request asks the adapter *handle* it was admitted with (one load of
an adapter); adapters are attached and removed on the decoding thread, between two batches
(:meth:`Batcher.between_batches`), and a batch's requests whose handle is gone by then are refused
there (404), never answered by the base or by a later load of the same name. A batch that fails is
decoded again one request at a time, so one request's failure is its own; one that fails because
its model cannot mix adapters in a forward (``UnroutableMix``) turns mixing off for good.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import count

from loraqa.inference.answerer import Answerer
from loraqa.io import log
from loraqa.model.adapters import display_name
from loraqa.model.multilora import BASE, UnroutableMix
from loraqa.serve.request import RequestError


@dataclass(eq=False)
class Ask:
    """One request's questions, waiting or decoding."""

    features: list
    done: asyncio.Future
    passage: str = ""
    adapter: str | None = None            # the LoRA adapter handle it asks (model.adapters), None: the model as loaded
    contexts: list[str] | None = None     # each question's passage (answers held to it)
    on_token: object = None               # on_token(question index, token id), called on the event loop
    tokens: list[list[int]] = field(default_factory=list)  # each question's tokens, as decoded
    na_probs: list[float] = field(default_factory=list)    # each question's no-answer probability


def decoding_thread() -> ThreadPoolExecutor:
    """The one thread a server's torch work runs on. OpenMP keeps a team of threads for each thread
    that calls into torch; a second team on the same cores (the model loaded on the main thread,
    decoded on another) made decoding 30% slower on 2 cores: load in it too (``serve.server``)."""
    return ThreadPoolExecutor(1, thread_name_prefix="loraqa-decode")


READ_AHEAD = 4096  # windows waiting to be read ahead, the oldest dropped past it


class Batcher:
    """Groups concurrent requests into decoding batches; decodes in one worker thread."""

    def __init__(self, answerer: Answerer, max_batch_size: int = 32, max_wait_ms: float = 10.0,
                 worker: ThreadPoolExecutor | None = None, mix_adapters: bool = True) -> None:
        self.answerer, self.max_batch_size, self.max_wait = answerer, max_batch_size, max_wait_ms / 1000
        self.mix_adapters = mix_adapters  # False: one adapter's requests a batch (servers that cannot mix them)
        self.waiting: list[Ask] = []  # oldest first
        self.wake = asyncio.Event()
        # torch runs here, one batch at a time; ``serve`` loads the model in it too (decoding_thread)
        self.worker = worker or decoding_thread()
        self.ids = count()
        self.batches = self.questions = 0  # served so far (GET /health)
        self.running = 0                   # questions in the batch decoding now
        self.last_batch = 0                # questions in the last batch (its occupancy)
        self.cache_tokens = 0              # the running batch's cached tokens: prompts and answers
        self.running_adapters: set[str] = set()
        # (adapter handle or None, window text): documents' windows to read while no request waits
        self.ahead: deque[tuple[str | None, str]] = deque(maxlen=READ_AHEAD)
        self.reading_ahead = 0  # 1 while a window taken from ``ahead`` is being read

    async def answer(self, features: list, passage: str = "", contexts: list[str] | None = None,
                     adapter: str | None = None, on_token=None) -> list[str]:
        """Answers for ``features``, in order, decoded with whatever else is waiting (``Ask`` says
        the rest); their tokens are in the returned answers' ``Ask`` too (:meth:`ask`)."""
        return (await self.ask(features, passage, contexts, adapter, on_token))[0]

    async def ask(self, features: list, passage: str = "", contexts: list[str] | None = None,
                  adapter: str | None = None, on_token=None) -> tuple[list[str], Ask]:
        """(answers, the request's ``Ask``, its tokens filled)."""
        # request ids may clash: each question gets its own, and a document question's windows name this request's
        request = next(self.ids)
        features = [replace(f, id=f"{next(self.ids)}", window_of=f.window_of and (f"{request}:{f.window_of[0]}",
                                                                                   f.window_of[1])) for f in features]
        item = Ask(features, asyncio.get_running_loop().create_future(), passage, adapter,
                   contexts or [passage] * len(features), on_token, [[] for _ in features])
        self.waiting.append(item)
        self.wake.set()
        return await item.done, item

    def read_ahead(self, adapter: str | None, windows: list[str]) -> None:
        """Read ``windows`` of a document just asked about while no request waits, their keys and values
        kept (``Answerer.read_ahead``), so the next question about it reads none of them again."""
        queued = set(self.ahead)  # a document asked about again: its windows wait once
        self.ahead.extend(dict.fromkeys((adapter, w) for w in windows if (adapter, w) not in queued))
        self.wake.set()

    def size(self) -> int:
        return sum(len(a.features) for a in self.waiting)

    def waiting_adapters(self) -> list[str]:
        return sorted({display_name(a.adapter) for a in self.waiting if a.adapter})

    def take(self) -> list[Ask]:
        """The next batch: whole (passage, adapter) groups, oldest first, up to ``max_batch_size``
        questions (a larger request goes alone). A passage split over two batches is prefilled twice,
        so the questions about the oldest request's passage go together even when others arrived in
        between. Requests given up while waiting (a client gone, ``--request-timeout``) are dropped."""
        self.waiting = [a for a in self.waiting if not a.done.done()]
        adapters = self.answerer.adapters
        mix = self.mix_adapters and (adapters is None or adapters.mixable)
        order = list(dict.fromkeys((a.passage, a.adapter) for a in self.waiting
                                   if mix or a.adapter == self.waiting[0].adapter))
        batch, size = [], 0
        for key in order:
            for item in [a for a in self.waiting if (a.passage, a.adapter) == key]:
                if not batch or size + len(item.features) <= self.max_batch_size:
                    batch.append(item)
                    size += len(item.features)
        taken = {id(item) for item in batch}
        self.waiting = [a for a in self.waiting if id(a) not in taken]
        return batch

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.waiting:
                if self.ahead:  # idle: one window (a prefill of ~0.5 s on 2 cores), then look again
                    self.reading_ahead = 1
                    try:
                        await loop.run_in_executor(self.worker, self._read_ahead, *self.ahead.popleft())
                    finally:
                        self.reading_ahead = 0
                    continue
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
            if not batch:  # every request waiting had been given up
                continue
            self.running = self.last_batch = sum(len(a.features) for a in batch)
            self.running_adapters = {display_name(a.adapter) for a in batch if a.adapter}
            self.cache_tokens = sum(len(f.input_ids) + self.answerer.settings.max_new_tokens
                                    for a in batch for f in a.features)
            try:
                await self._decode(loop, batch)
            except Exception as e:  # noqa: BLE001 - one request at a time: each failure its own
                if isinstance(e, UnroutableMix) and self.mix_adapters:
                    self.mix_adapters = False
                    log(f"adapters are decoded one adapter a batch from now on: {e}")
                for item in batch:
                    if item.done.done():
                        continue
                    if item.on_token is not None and any(item.tokens):  # its stream has begun: no replay
                        item.done.set_exception(e)
                        continue
                    item.tokens = [[] for _ in item.features]
                    try:
                        await self._decode(loop, [item])
                    except Exception as alone:  # noqa: BLE001 - this request fails, the others are answered
                        if not item.done.done():
                            item.done.set_exception(alone)
            finally:
                self.running, self.running_adapters, self.cache_tokens = 0, set(), 0

    async def _decode(self, loop, batch: list[Ask]) -> None:
        owner = {f.id: (a, n) for a in batch for n, f in enumerate(a.features)}

        def heard(feature_id: str, token: int) -> bool:  # on the decoding thread; True: its client is gone
            item, n = owner[feature_id]
            item.tokens[n].append(token)
            if item.on_token is not None:
                loop.call_soon_threadsafe(item.on_token, n, token)
            return item.done.done()

        gone, answers, probs = await loop.run_in_executor(self.worker, self._decode_held, batch, heard)
        for item in gone:
            if not item.done.done():
                item.done.set_exception(RequestError(404, f"the model {display_name(item.adapter)!r} was unloaded"))
        answered = [a for a in batch if all(a is not g for g in gone)]
        self.batches += 1
        self.questions += sum(len(a.features) for a in answered)
        for item in answered:
            if not item.done.done():  # a client that went away cancelled its future
                item.na_probs = [probs[f.id] for f in item.features]
                item.done.set_result([answers[f.id] for f in item.features])

    def _decode_held(self, batch: list[Ask], heard) -> tuple[list[Ask], dict[str, str], dict[str, float]]:
        """On the decoding thread, where adapters are attached and removed: (the requests whose
        adapter is no longer held, the others' answers, their no-answer probabilities)."""
        adapters = self.answerer.adapters
        gone = [a for a in batch if a.adapter is not None and not adapters.holds(a.adapter)]
        asks = [a for a in batch if all(a is not g for g in gone)]
        features = [f for a in asks for f in a.features]
        if not features:
            return gone, {}, {}
        contexts = {f.id: c for a in asks for f, c in zip(a.features, a.contexts)}
        routes = None if adapters is None else {f.id: a.adapter or BASE for a in asks for f in a.features}
        probs: dict[str, float] = {}
        return gone, self.answerer.decode(features, contexts, adapters=routes, on_token=heard, na_probs=probs), probs

    def _read_ahead(self, adapter: str | None, window: str) -> None:
        """On the decoding thread: keep one window, unless its adapter was unloaded meanwhile."""
        adapters = self.answerer.adapters
        if adapter is None or (adapters is not None and adapters.holds(adapter)):
            try:
                self.answerer.read_ahead(window, adapter)
            except Exception as e:  # noqa: BLE001 - a window not read ahead is read when asked
                log(f"reading ahead failed ({type(e).__name__}: {e}); the window is read when a question asks it")

    async def between_batches(self, work):
        """``work()`` on the decoding thread, after the batch decoding now (if any), before the next."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, work)

    def drop_adapter(self, handle: str, error: Exception) -> None:
        """Fail the requests waiting for an adapter (its handle) that was removed."""
        for item in [a for a in self.waiting if a.adapter == handle]:
            if not item.done.done():
                item.done.set_exception(error)
        self.waiting = [a for a in self.waiting if a.adapter != handle]

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)
