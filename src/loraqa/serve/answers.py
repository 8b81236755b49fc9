"""``POST /answer``: loraqa's own route, one question or a list of them.

    {"context": ..., "question": ..., "model"?: ...}
        -> {"answer": ..., "no_answer": bool, "start": int|null, "end": int|null, "seconds": ...}
    {"questions": [{"context", "question", "id"?}, ...], "model"?: ...}
        -> {"answers": [{"id", "question", "answer", "no_answer", "start", "end"}, ...], "seconds"}

``no_answer`` is true when the model says the passage does not answer the question (the answer is
then ""); ``start`` and ``end`` are the answer's character offsets in the passage, where it is
found there (its first occurrence). A passage longer than a window (a whole document) is read in
windows (``inference.documents``): its answer also says the ``window`` it came from
({"index", "start", "end", "score", "windows_read"}), and no_answer means "not found in the document".
"""

from __future__ import annotations

import time

from loraqa.serve.request import parse_questions
from loraqa.serve.service import Service


def offsets(context: str, answer: str) -> tuple[int | None, int | None]:
    """The answer's character span in the passage (its first occurrence), or (None, None)."""
    start = context.find(answer) if answer else -1
    return (start, start + len(answer)) if start >= 0 else (None, None)


async def answer(service: Service, request):
    from starlette.responses import JSONResponse

    start = time.perf_counter()
    try:
        examples, single, model = await service.off_loop(parse_questions, await service.body_of(request, "key"))
        done, _, _ = await service.read(examples, single, service.adapter_of(model))
    except Exception as e:  # noqa: BLE001 - a refusal, or a failure named by an id; the server goes on
        return service.respond(e)
    service.answered("/answer", start, len(examples))
    seconds = round(time.perf_counter() - start, 4)
    rows = [answer_row(ex, done.answers[ex.id], done.sources.get(ex.id)) for ex in examples]
    if single:
        return JSONResponse({**rows[0], "seconds": seconds})
    return JSONResponse({"answers": [{"id": ex.id, "question": ex.question, **row}
                                     for ex, row in zip(examples, rows)], "seconds": seconds})


def answer_row(example, answer: str, source=None) -> dict:
    """An answer, its offsets in the passage and, for a passage read in windows, the window it came from."""
    if source is None:
        return {"answer": answer, "no_answer": not answer, **dict(zip(("start", "end"), offsets(example.context, answer)))}
    return {"answer": answer, "no_answer": not answer, "start": source.start, "end": source.end,
            "window": {"index": source.window, "start": source.window_start, "end": source.window_end,
                       "score": round(source.score, 4), "windows_read": source.windows_read}}
