"""OpenAI's Completions and Chat APIs over loraqa's answering: what a request may ask, and what comes
back in OpenAI's own shapes, so the ``openai`` client (and LangChain, LlamaIndex) work unchanged.

How a question reaches the model:
- ``POST /v1/chat/completions``: the **system** message is the passage, the **last user** message the
  question; the run's template puts them together, as ``loraqa ask`` does. The shapes the question-
  answering frameworks send by default (an instruction, then context and question in one message:
  LangChain, LlamaIndex, Haystack) are read as passage and question too (``serve.qa_forms``). Other
  messages (earlier turns, an assistant's) are read past; what has no passage and question is a 400.
- ``POST /v1/completions``: the prompt is the model's whole prompt. One in the run's template's form
  (``Context: ...\\nQuestion: ...\\nAnswer:``), or a framework's (``serve.qa_forms``), is read back as
  a passage and a question, so it is answered exactly as ``/answer`` and ``ask`` answer them (and
  batched with others on its passage); any other prompt is answered as it stands.

``model`` names a LoRA adapter the server holds, or its base (``GET /v1/models`` lists them).
Decoding is greedy, as the answers are extractive. What a request may ask, parameter by parameter
(as vLLM and llama-server do, a parameter the server cannot honour is refused with a 400 naming it,
never dropped in silence):

| parameter | |
| --- | --- |
| ``max_tokens`` / ``max_completion_tokens`` | cuts the answer (``finish_reason`` "length"); over the server's ``--max-new-tokens``: 400 |
| ``stop`` | up to 4 strings; the answer ends before the first |
| ``stream``, ``stream_options.include_usage`` | server-sent events |
| ``temperature`` 0, ``top_p`` 1, ``n`` / ``best_of`` 1, penalties 0 | what greedy decoding is; any other value: 400 |
| ``seed``, ``user``, ``metadata``, ``store`` | accepted and ignored: greedy answers do not depend on them |
| ``logprobs``, ``top_logprobs``, ``echo``, ``suffix``, ``logit_bias``, ``tools``, ``functions``, ``tool_choice``, ``response_format`` other than text | 400 |

The answer is ``/answer``'s (the first line, stripped; "" where the model says the passage does
not answer); ``max_tokens`` and ``stop`` cut it. ``usage`` counts the prompt's tokens and the
tokens decoded for the answer (its stop token included).
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

from loraqa.data.prompt import cut_answer
from loraqa.serve.qa_forms import QA, SHAPES, read_messages, read_text
from loraqa.serve.request import RequestError


# parameters that greedy, one-answer decoding honours only at these values (OpenAI's defaults)
NEUTRAL = {"top_p": 1, "presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1}
UNSERVED = ("echo", "suffix", "logit_bias", "tools", "functions", "tool_choice", "function_call")


class OpenAIError(RequestError):
    """A refusal in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, reason: str, param: str | None = None) -> None:
        super().__init__(status, reason)
        self.param = param

    def body(self) -> dict:
        return error_body(self.status, self.reason, self.param)


def error_body(status: int, reason: str, param: str | None = None) -> dict:
    """OpenAI's error shape for a status: every 4xx a client's error, 401 its key's."""
    kind = ("authentication_error" if status == 401 else "invalid_request_error" if 400 <= status < 500
            else "server_error")
    return {"error": {"message": reason, "type": kind, "param": param,
                      "code": "model_not_found" if status == 404 else None}}


@dataclass
class Completion:
    """What one Completions or Chat request asks."""

    chat: bool
    model: str
    context: str | None = None    # the passage and question, where the request has them
    question: str | None = None
    prompt: str | None = None     # a Completions prompt not in the template's form: answered as it stands
    form: str = "template"        # the shape the passage and question were read from (serve.qa_forms)
    existing: str | None = None   # LlamaIndex's refine: the answer it had, kept where this passage has none
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def parse_completion(body: object, chat: bool, template: str, models: list[str], max_new_tokens: int) -> Completion:
    """A request body as a :class:`Completion`; ``OpenAIError`` (400, or 404 for an unknown model)."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError(400, "'model' is required: a name from GET /v1/models")
    if model not in models:
        raise OpenAIError(404, f"the model {model!r} does not exist here; GET /v1/models lists {', '.join(models)}")
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or temperature != 0):
        raise OpenAIError(400, f"temperature {temperature!r}: loraqa answers greedily (its answers are extractive); "
                               "leave it out or send 0")
    for key in ("n", "best_of"):
        if body.get(key) not in (None, 1):
            raise OpenAIError(400, f"{key} {body[key]!r}: one greedy answer a request; leave it out or send 1")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
        raise OpenAIError(400, "logprobs are not returned by this server", "logprobs")
    _check_unserved(body)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise OpenAIError(400, f"max_tokens {max_tokens!r}: a positive integer", "max_tokens")
    if max_tokens is not None and max_tokens > max_new_tokens:
        raise OpenAIError(400, f"max_tokens {max_tokens}: this server's answers are at most {max_new_tokens} tokens "
                               "(its --max-new-tokens); send at most that, or leave it out", "max_tokens")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise OpenAIError(400, "stop: a non-empty string or a list of at most 4")
    options = body.get("stream_options") or {}
    request = Completion(chat, model, max_tokens=max_tokens, stop=stop, stream=bool(body.get("stream")),
                         include_usage=isinstance(options, dict) and bool(options.get("include_usage")))
    if chat:
        qa = _messages(body.get("messages"))
        request.context, request.question, request.form, request.existing = qa.context, qa.question, qa.form, \
            qa.existing
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt.strip():
            raise OpenAIError(400, "'prompt' must be one non-empty string (one prompt a request)")
        read = read_template(template, prompt)
        qa = None if read is not None else read_text(prompt)
        if read is not None:
            request.context, request.question = read
        elif qa is not None:
            request.context, request.question, request.form, request.existing = qa.context, qa.question, qa.form, \
                qa.existing
        else:
            request.prompt = prompt
    return request


def _check_unserved(body: dict) -> None:
    """A 400 naming the first parameter this server would not honour (the module's table)."""
    for key, neutral in NEUTRAL.items():
        value = body.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value != neutral):
            raise OpenAIError(400, f"{key} {value!r}: loraqa answers greedily; leave it out or send {neutral}", key)
    for key in UNSERVED:
        if body.get(key) not in (None, False, "", {}, [], "none"):
            raise OpenAIError(400, f"{key}: not served here (extractive answers, greedy, one a request)", key)
    kind = body.get("response_format")
    if kind is not None and kind != {"type": "text"}:
        raise OpenAIError(400, "response_format: answers are plain text; leave it out or send {\"type\": \"text\"}",
                          "response_format")


def _messages(messages: object) -> QA:
    """The passage and question of the system message and the last user message (``serve.qa_forms``)."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise OpenAIError(400, "'messages' must be a list of {role, content} objects")
    texts = {}
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's parts: [{"type": "text", "text": ...}]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if m.get("role") in ("system", "developer", "user") and isinstance(content, str):
            texts["user" if m["role"] == "user" else "system"] = content
    if texts.get("user", "").strip():
        qa = read_messages(texts.get("system"), texts["user"])
    else:  # one system message holding everything (Haystack's get-started example)
        qa = read_text(texts.get("system", ""))
    if qa is None:
        raise OpenAIError(400, f"no passage and question found: send {SHAPES} (docs/frameworks.md)")
    return qa


def read_template(template: str, prompt: str) -> tuple[str, str] | None:
    """(passage, question) of a prompt in ``template``'s form, else None."""
    parts = re.split(r"(\{context\}|\{question\})", template)
    pattern = "".join("(?P<context>.*)" if p == "{context}" else "(?P<question>.*?)" if p == "{question}"
                      else re.escape(p) for p in parts)
    match = re.fullmatch(pattern, prompt, re.DOTALL)
    if match is None or not match["context"].strip() or not match["question"].strip():
        return None
    return match["context"], match["question"]


def finish(tokenizer, tokens: list[int], answer: str, request: Completion, limit: int) -> tuple[str, str, int]:
    """(answer, finish_reason, tokens decoded) for a question's tokens and ``/answer``'s ``answer``
    of them ("" where the model abstained), ``max_tokens`` and ``stop`` applied."""
    if not answer:  # the model says the passage does not answer: "" as on /answer, whatever it said
        return "", "stop", len(tokens)
    kept = tokens if request.max_tokens is None else tokens[:request.max_tokens]
    text = answer if len(kept) == len(tokens) else cut_answer(tokenizer.decode(kept, skip_special_tokens=True))
    reason = "length" if len(tokens) > len(kept) or (len(kept) == limit and not _stopped(tokenizer, kept)) else "stop"
    cut = _first_stop(text, request.stop)
    if cut is not None:
        text, reason = text[:cut].rstrip(), "stop"
    return text, reason, len(kept)


def _stopped(tokenizer, tokens: list[int]) -> bool:
    """Whether the tokens end the answer themselves (EOS, or a newline in the text)."""
    return bool(tokens) and (tokens[-1] == tokenizer.eos_token_id or "\n" in tokenizer.decode(tokens[-1:]))


def _first_stop(text: str, stop: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


class Deltas:
    """A stream's text pieces: each the answer's new part, never one that a later token would take
    back (trailing spaces, half of a character, the start of a stop string, what may still become
    the model's no-answer phrase), so that they add up to :func:`finish`'s answer exactly. With a
    no-answer threshold, whether a question is answered at all is known only at its end: ``hold``
    sends the answer whole then."""

    def __init__(self, tokenizer, request: Completion, no_answer: str = "", hold: bool = False) -> None:
        self.tokenizer, self.request, self.sent, self.tokens, self.done = tokenizer, request, "", [], False
        self.no_answer, self.hold = no_answer, hold

    def push(self, token: int) -> str:
        if self.done or self.hold:
            return ""
        self.tokens.append(token)
        kept = self.tokens if self.request.max_tokens is None else self.tokens[:self.request.max_tokens]
        raw = self.tokenizer.decode(kept, skip_special_tokens=True).lstrip()
        text, self.done = (raw.split("\n", 1)[0], True) if "\n" in raw else (raw, False)
        cut = _first_stop(text, self.request.stop)
        if cut is not None:
            text, self.done = text[:cut], True
        text = text.rstrip().rstrip("\ufffd")
        if self.no_answer and self.no_answer.startswith(text):  # it may yet be the phrase, which answers ""
            return ""
        for s in self.request.stop:  # hold back what could still become a stop string
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    text = text[:-n]
                    break
        return self._advance(text)

    def rest(self, answer: str) -> str:
        """What is left to send of the final answer."""
        return self._advance(answer)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def response(request: Completion, answer: str, reason: str, usage: dict) -> dict:
    """A whole (non-streamed) answer in OpenAI's shape."""
    if request.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": answer}, "logprobs": None,
                  "finish_reason": reason}
    else:
        choice = {"index": 0, "text": answer, "logprobs": None, "finish_reason": reason}
    return {**_head(request), "choices": [choice], "usage": usage}


def chunk(request: Completion, text: str | None = None, reason: str | None = None, first: bool = False,
          usage: dict | None = None) -> dict:
    """One server-sent event's data: a piece of the answer, or the end (``reason``), or the usage."""
    if usage is not None:
        return {**_head(request, stream=True), "choices": [], "usage": usage}
    if request.chat:
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
    return {**_head(request, stream=True), "choices": [choice]}


def _head(request: Completion, stream: bool = False) -> dict:
    kind = ("chat.completion.chunk" if stream else "chat.completion") if request.chat else "text_completion"
    return {"id": f"{'chatcmpl' if request.chat else 'cmpl'}-{request.id}", "object": kind, "created": request.created,
            "model": request.model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
