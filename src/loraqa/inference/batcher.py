"""Concurrent requests decoded together: the server's queue in front of ``Answerer.decode``."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import count

from loraqa.inference.answerer import Answerer


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
        about the oldest request's passage go together even when others arrived in between.
        Requests given up while waiting (a client gone, ``--request-timeout``) are dropped."""
        for features, done, _ in [w for w in self.waiting if w[1].done()]:
            for f in features:
                self.contexts.pop(f.id, None)
        self.waiting = [w for w in self.waiting if not w[1].done()]
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
            if not features:  # every request waiting had been given up
                continue
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
