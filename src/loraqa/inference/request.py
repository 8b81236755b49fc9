"""What the server reads from a request: the body (every oversized one answered with a 413), the
questions in it, each checked, and whether each passage fits the model uncut."""

from __future__ import annotations

import json
import time

from loraqa.data.examples import Example
from loraqa.inference.answerer import Answerer

MAX_BODY_BYTES = 1 << 20
MAX_QUESTIONS = 256  # in one request; a request is never split across batches
DRAIN_SECONDS = 10.0  # how long the rest of an oversized body is read and dropped


class RequestError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def parse_questions(body: bytes) -> tuple[list[Example], bool]:
    """(examples, single) from a request body; ``RequestError`` naming the first problem."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, an integer too long to convert
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


async def read_body(request, limit: int = MAX_BODY_BYTES, drain_seconds: float = DRAIN_SECONDS) -> bytes:
    """The body; ``RequestError`` 413 for one over ``limit`` bytes, whatever its size and however it
    is sent (``Content-Length`` or chunked). The rest of an oversized body is read and dropped, as
    nginx's lingering close does, so the client has sent everything when the 413 comes and reads it;
    a body still arriving after ``drain_seconds`` is cut off (the connection closes)."""
    body, size, stop = bytearray(), 0, time.monotonic() + drain_seconds
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            body += chunk
        elif time.monotonic() > stop:
            break
    if size > limit:
        raise RequestError(413, f"body over {limit} bytes")
    return bytes(body)


async def drain(request, seconds: float = DRAIN_SECONDS) -> None:
    """Read and drop what is left of the body, for at most ``seconds``: a client answered before
    it has sent its whole body would see the connection reset instead of the answer."""
    stop = time.monotonic() + seconds
    async for _ in request.stream():
        if time.monotonic() > stop:
            break
