"""What the server reads from a request: the body (every oversized one answered with a 413), the
questions in it, each checked, and the questions asked for them (a long passage's in its windows)."""

from __future__ import annotations

import asyncio
import json
import time

from loraqa.data.examples import Example
from loraqa.data.features import Feature
from loraqa.inference.answerer import Answerer
from loraqa.inference.documents import SEP, mark_windows, plan, token_counts

MAX_BODY_BYTES = 1 << 20
MAX_QUESTIONS = 256  # in one request; a request is never split across batches
DRAIN_SECONDS = 10.0  # how long the rest of an oversized body is read and dropped
READ_SECONDS = 10.0  # a body not received in this long, whatever its size, is cut off (408)
# tokens one request's prompt may hold (--max-prompt-tokens): a prefill of 2,048 tokens takes a few
# seconds on 2 CPU cores for a 135M model (SmolLM2: ~1.4 ms a token), and a batch waits for it
MAX_PROMPT_TOKENS = 2048
# tokens one passage may hold (--max-document-tokens): it is read in windows, each question in a few of them
MAX_DOCUMENT_TOKENS = 1 << 17


class RequestError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def parse_json(body: bytes) -> object:
    """The body as JSON; ``RequestError`` 400 for anything Python cannot parse or convert."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, an integer too long to convert
        raise RequestError(400, f"body is not valid JSON ({getattr(e, 'msg', e)})") from None


def parse_questions(body: bytes) -> tuple[list[Example], bool, str | None]:
    """(examples, single, model) from a request body; ``RequestError`` naming the first problem.
    ``model``: the adapter (or base) the body names, None when it names none."""
    data = parse_json(body)
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
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(422, "field 'model' must be a string: an adapter's name or the base's (GET /v1/models)")
    return examples, single, model


def check_fits(answerer: Answerer, examples: list[Example], single: bool,
               max_prompt_tokens: int = MAX_PROMPT_TOKENS, max_document_tokens: int = MAX_DOCUMENT_TOKENS):
    """(the plan, one feature per question it asks): a passage longer than a window is asked in its
    windows (``inference.documents``). ``RequestError`` for a question that does not fit even in a
    window (422), a prompt over ``max_prompt_tokens`` or a passage over ``max_document_tokens`` (413),
    with the numbers."""
    tokenizer, settings = answerer.tokenizer, answerer.settings
    counts = token_counts(tokenizer, examples)  # each passage tokenised once, for the bound and the plan
    for n, ex in enumerate(examples):
        if counts[ex.context] > max_document_tokens:
            raise RequestError(413, f"{_where(single, n)}passage of {counts[ex.context]:,} tokens, over this server's "
                                    f"--max-document-tokens {max_document_tokens:,}")
    asked = plan(tokenizer, examples, settings, counts)
    index = {ex.id: n for n, ex in enumerate(examples)}
    features = []
    for ex in asked.asked:
        got, stats = answerer.features([ex])
        where = _where(single, index[ex.id.split(SEP)[0]])
        if stats.windowed or stats.dropped:
            what = "question too long" if stats.dropped or SEP in ex.id else "passage too long"
            raise RequestError(422, f"{where}{what}: the prompt must fit in {settings.max_length - settings.max_new_tokens}"
                                    f" tokens (the model's {settings.max_length} less {settings.max_new_tokens} for the "
                                    "answer); shorten it")
        _check_prompt(got[0], max_prompt_tokens, where)
        features += got
    return asked, mark_windows(tokenizer, features, asked, settings.template)


def _where(single: bool, n: int) -> str:
    return "" if single else f"questions[{n}]: "


def prompt_feature(answerer: Answerer, prompt: str, max_prompt_tokens: int = MAX_PROMPT_TOKENS) -> Feature:
    """A raw prompt (an OpenAI completion not in the template's form) as it stands, checked as above."""
    ids = answerer.tokenizer(prompt)["input_ids"]
    settings = answerer.settings
    if len(ids) + settings.max_new_tokens > settings.max_length:
        raise RequestError(422, f"prompt of {len(ids):,} tokens: it must fit in {settings.max_length - settings.max_new_tokens:,} "
                                f"(the model's {settings.max_length} less {settings.max_new_tokens} for the answer)")
    feature = Feature("prompt", ids, len(ids))
    _check_prompt(feature, max_prompt_tokens, "")
    return feature


def _check_prompt(feature: Feature, max_prompt_tokens: int, where: str) -> None:
    if feature.n_prompt > max_prompt_tokens:
        raise RequestError(413, f"{where}prompt of {feature.n_prompt:,} tokens, over this server's "
                                f"--max-prompt-tokens {max_prompt_tokens:,}; ask with a shorter passage")


async def read_body(request, limit: int = MAX_BODY_BYTES, drain_seconds: float = DRAIN_SECONDS,
                    deadline: float | None = None) -> bytes:
    """The body; ``RequestError`` 413 for one over ``limit`` bytes, whatever its size and however it
    is sent (``Content-Length`` or chunked). The rest of an oversized body is read and dropped, as
    nginx's lingering close does, so the client has sent everything when the 413 comes and reads it;
    a body still arriving after ``drain_seconds`` is cut off (the connection closes). A body of any
    size not received within ``deadline`` seconds (a client that stalls) is a 408."""
    body, size, deadline = bytearray(), [0], deadline or READ_SECONDS

    async def read() -> None:
        stop = time.monotonic() + drain_seconds
        async for chunk in request.stream():
            size[0] += len(chunk)
            if size[0] <= limit:
                body.extend(chunk)
            elif time.monotonic() > stop:
                break

    try:
        await asyncio.wait_for(read(), deadline)
    except asyncio.TimeoutError:
        if size[0] <= limit:
            raise RequestError(408, f"the body did not arrive within {deadline:g} s") from None
    if size[0] > limit:
        raise RequestError(413, f"body over {limit} bytes")
    return bytes(body)


async def drain(request, seconds: float = DRAIN_SECONDS) -> None:
    """Read and drop what is left of the body, for at most ``seconds``: a client answered before
    it has sent its whole body would see the connection reset instead of the answer."""
    stop = time.monotonic() + seconds
    async for _ in request.stream():
        if time.monotonic() > stop:
            break
