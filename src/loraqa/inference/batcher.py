"""Concurrent requests decoded together: the server's queue in front of ``Answerer.decode``.

Requests for different LoRA adapters share a batch (``model.adapters``): a passage's questions go
together for one adapter at a time (their prefill is shared), and the batch takes them oldest
first whatever their adapter. Adapters are attached and removed on the decoding thread, between two
batches (:meth:`Batcher.between_batches`). A batch that fails is decoded again one request at a
time, so one request's failure is its own.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import count

from loraqa.inference.answerer import Answerer


@dataclass
class Ask:
    """One request's questions, waiting or decoding."""

    features: list
    done: asyncio.Future
    passage: str = ""
    adapter: str | None = None            # the LoRA adapter it asks (model.adapters), None: the model as loaded
    contexts: list[str] | None = None     # each question's passage (answers held to it)
    on_token: object = None               # on_token(question index, token id), called on the event loop
    tokens: list[list[int]] = field(default_factory=list)  # each question's tokens, as decoded


def decoding_thread() -> ThreadPoolExecutor:
    """The one thread a server's torch work runs on. OpenMP keeps a team of threads for each thread
    that calls into torch; a second team on the same cores (the model loaded on the main thread,
    decoded on another) made decoding 30% slower on 2 cores: load in it too (``inference.server``)."""
    return ThreadPoolExecutor(1, thread_name_prefix="loraqa-decode")


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

    async def answer(self, features: list, passage: str = "", contexts: list[str] | None = None,
                     adapter: str | None = None, on_token=None) -> list[str]:
        """Answers for ``features``, in order, decoded with whatever else is waiting (``Ask`` says
        the rest); their tokens are in the returned answers' ``Ask`` too (:meth:`ask`)."""
        return (await self.ask(features, passage, contexts, adapter, on_token))[0]

    async def ask(self, features: list, passage: str = "", contexts: list[str] | None = None,
                  adapter: str | None = None, on_token=None) -> tuple[list[str], Ask]:
        """(answers, the request's ``Ask``, its tokens filled)."""
        features = [replace(f, id=f"{next(self.ids)}") for f in features]  # request ids may clash
        item = Ask(features, asyncio.get_running_loop().create_future(), passage, adapter,
                   contexts or [passage] * len(features), on_token, [[] for _ in features])
        self.waiting.append(item)
        self.wake.set()
        return await item.done, item

    def size(self) -> int:
        return sum(len(a.features) for a in self.waiting)

    def waiting_adapters(self) -> list[str]:
        return sorted({a.adapter for a in self.waiting if a.adapter})

    def take(self) -> list[Ask]:
        """The next batch: whole (passage, adapter) groups, oldest first, up to ``max_batch_size``
        questions (a larger request goes alone). A passage split over two batches is prefilled twice,
        so the questions about the oldest request's passage go together even when others arrived in
        between. Requests given up while waiting (a client gone, ``--request-timeout``) are dropped."""
        self.waiting = [a for a in self.waiting if not a.done.done()]
        order = list(dict.fromkeys((a.passage, a.adapter) for a in self.waiting
                                   if self.mix_adapters or a.adapter == self.waiting[0].adapter))
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
            self.running_adapters = {a.adapter for a in batch if a.adapter}
            self.cache_tokens = sum(len(f.input_ids) + self.answerer.settings.max_new_tokens
                                    for a in batch for f in a.features)
            try:
                await self._decode(loop, batch)
            except Exception as e:  # noqa: BLE001 - one request at a time: each failure its own
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
        features = [f for a in batch for f in a.features]
        owner = {f.id: (a, n) for a in batch for n, f in enumerate(a.features)}
        contexts = {f.id: c for a in batch for f, c in zip(a.features, a.contexts)}
        adapters = None
        if self.answerer.adapters is not None:
            from loraqa.model.adapters import BASE

            adapters = {f.id: a.adapter or BASE for a in batch for f in a.features}

        def heard(feature_id: str, token: int) -> None:  # on the decoding thread
            item, n = owner[feature_id]
            item.tokens[n].append(token)
            if item.on_token is not None:
                loop.call_soon_threadsafe(item.on_token, n, token)

        answers = await loop.run_in_executor(self.worker, lambda: self.answerer.decode(
            features, contexts, adapters=adapters, on_token=heard))
        self.batches, self.questions = self.batches + 1, self.questions + len(features)
        for item in batch:
            if not item.done.done():  # a client that went away cancelled its future
                item.done.set_result([answers[f.id] for f in item.features])

    async def between_batches(self, work):
        """``work()`` on the decoding thread, after the batch decoding now (if any), before the next."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, work)

    def drop_adapter(self, name: str, error: Exception) -> None:
        """Fail the requests waiting for an adapter that was removed."""
        for item in [a for a in self.waiting if a.adapter == name]:
            if not item.done.done():
                item.done.set_exception(error)
        self.waiting = [a for a in self.waiting if a.adapter != name]

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)
