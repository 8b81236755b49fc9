"""``POST /answer``: loraqa's own route, one question or a list of them.

    {"context": ..., "question": ..., "model"?: ...}
        -> {"answer": ..., "no_answer": bool, "start": int|null, "end": int|null, "seconds": ...}
    {"questions": [{"context", "question", "id"?}, ...], "model"?: ...}
        -> {"answers": [{"id", "question", "answer", "no_answer", "start", "end"}, ...], "seconds"}

``no_answer`` is true when the model says the passage does not answer the question (the answer is
then ""); ``start`` and ``end`` are the answer's character offsets in the passage, where it is
found there (its first occurrence).
"""

from __future__ import annotations

import time

from loraqa.serve.request import check_fits, parse_questions
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
        adapter = service.adapter_of(model)
        features = await service.off_loop(check_fits, service.answerer, examples, single,
                                          service.limits.max_prompt_tokens)
        answers, _ = await service.decoded(features, examples[0].context, [ex.context for ex in examples], adapter)
    except Exception as e:  # noqa: BLE001 - a refusal, or a failure named by an id; the server goes on
        return service.respond(e)
    service.answered("/answer", start, len(answers))
    seconds = round(time.perf_counter() - start, 4)
    rows = [{"answer": a, "no_answer": not a, **dict(zip(("start", "end"), offsets(ex.context, a)))}
            for ex, a in zip(examples, answers)]
    if single:
        return JSONResponse({**rows[0], "seconds": seconds})
    return JSONResponse({"answers": [{"id": ex.id, "question": ex.question, **row}
                                     for ex, row in zip(examples, rows)], "seconds": seconds})
