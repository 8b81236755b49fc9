"""`loraqa serve` in-process: a real uvicorn server on 127.0.0.1 (a free port), stopped after."""

import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import request, start_server

from loraqa.cli import main
from loraqa.config import load_config
from loraqa.inference.answerer import ask, load_answerer
from loraqa.serve.batcher import Batcher
from loraqa.serve.request import MAX_BODY_BYTES
from loraqa.serve.app import build_app
from loraqa.serve.service import Limits


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    return load_config(None, {"model": str(tiny_model_dir), "precision": "fp32", "max_new_tokens": 5})


@pytest.fixture(scope="module")
def server(config):
    from conftest import SQUAD
    from loraqa.data.squad import load_squad_file

    answerer = load_answerer(config, None, load_squad_file(SQUAD))
    url, stop = start_server(build_app(answerer, Limits(max_batch_size=8, max_wait_ms=50)))
    yield url
    stop()


def test_answers_equal_ask_one_at_a_time_and_together(server, config, examples):
    expected = ask(config, None, examples)
    status, one = request(f"{server}/answer", {"context": examples[0].context, "question": examples[0].question})
    assert status == 200 and one["answer"] == expected[examples[0].id] and one["seconds"] >= 0
    assert one["no_answer"] is (one["answer"] == "")
    with ThreadPoolExecutor(len(examples)) as pool:  # every question at once, several per passage
        replies = list(pool.map(lambda ex: request(f"{server}/answer", {"context": ex.context, "question": ex.question}),
                                examples))
    assert [r[0] for r in replies] == [200] * len(examples)
    assert [r[1]["answer"] for r in replies] == [expected[ex.id] for ex in examples]
    status, health = request(f"{server}/health")
    assert status == 200 and health["status"] == "ok"
    assert health["batches"] < health["questions"], "concurrent requests were decoded together"


def test_many_questions_in_one_request_come_back_in_order(server, config, examples):
    expected = ask(config, None, examples)
    rows = [{"context": ex.context, "question": ex.question, "id": ex.id} for ex in examples[:5]]
    rows[1].pop("id")
    status, reply = request(f"{server}/answer", {"questions": rows})
    assert status == 200
    assert [a["id"] for a in reply["answers"]] == [examples[0].id, "2", *[ex.id for ex in examples[2:5]]]
    assert [a["answer"] for a in reply["answers"]] == [expected[ex.id] for ex in examples[:5]]


@pytest.mark.parametrize("body, status, reason", [
    (b"{not json", 400, "not valid JSON"),
    (b'{"context": "c", "question": "q", "id": ' + b"7" * 5000 + b"}", 400, "not valid JSON"),  # too long to convert
    (b"[1, 2]", 422, "JSON object"),
    ({"context": "Denver won."}, 422, "'question'"),
    ({"context": "Denver won.", "question": 3}, 422, "'question' must be a non-empty string"),
    ({"context": "Denver won.", "question": "   "}, 422, "non-empty"),
    ({"context": ["Denver"], "question": "Who?"}, 422, "'context'"),
    ({"questions": []}, 422, "non-empty list"),
    ({"questions": [{"context": "Denver won.", "question": "Who?"}, "x"]}, 422, "questions[1]"),
    ({"context": "Denver won the game.", "question": "Who won the game? " * 200}, 422, "question too long"),
    (b'{"context": "' + b"a" * MAX_BODY_BYTES + b'", "question": "Who?"}', 413, "body over"),
])
def test_bad_requests_get_a_4xx_with_a_reason_and_the_server_goes_on(server, body, status, reason):
    got, reply = request(f"{server}/answer", body)
    assert got == status and reason in reply["error"] and "\n" not in reply["error"]
    assert request(f"{server}/health")[0] == 200


def test_the_page_and_unknown_routes(server):
    with urllib.request.urlopen(f"{server}/", timeout=10) as response:
        page = response.read().decode()
    assert 'id="context"' in page and 'id="question"' in page and 'id="answer"' in page
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{server}/nowhere", timeout=10)
    assert e.value.code == 404


def test_the_batcher_takes_whole_passages_oldest_first_within_its_bound():
    import asyncio

    from loraqa.data.features import Feature

    from loraqa.inference.settings import DecodeSettings

    class Recorder:  # stands in for Answerer: records what is decoded together
        batches = []
        adapters = None
        settings = DecodeSettings(64)

        def decode(self, features, contexts, progress=False, adapters=None, on_token=None, na_probs=None):
            time.sleep(0.2)
            na_probs.update({f.id: 0.0 for f in features})
            self.batches.append([f.input_ids[0] for f in features])
            return {f.id: str(f.input_ids[0]) for f in features}

    async def scenario():
        batcher = Batcher(Recorder(), max_batch_size=3, max_wait_ms=0)
        runner = asyncio.create_task(batcher.run())
        first = asyncio.create_task(batcher.answer([Feature("q", [0], 1)], "p0"))
        await asyncio.sleep(0.05)  # the first batch is decoding; these wait, passages interleaved
        rest = [asyncio.create_task(batcher.answer([Feature("q", [i], 1)], p))
                for i, p in enumerate(["p1", "p2", "p1", "p2", "p1"], 1)]
        answers = await asyncio.wait_for(asyncio.gather(first, *rest), 10)
        runner.cancel()
        batcher.close()
        return answers

    assert asyncio.run(scenario()) == [[str(i)] for i in range(6)]  # each request gets its own answer
    assert Recorder.batches == [[0], [1, 3, 5], [2, 4]]  # p1's questions share a prefill, at most 3 a batch


def test_two_requests_windows_of_questions_with_one_id_are_not_rivals():
    """Two requests in one batch, each a question "q" read in two windows of its own document: each
    request's rows are rivals among themselves only (``inference.rivals`` ends the losers early)."""
    import asyncio

    from loraqa.data.features import Feature
    from loraqa.inference.settings import DecodeSettings

    class Recorder:  # stands in for Answerer: records the rivals it is given
        batches = []
        adapters = None
        settings = DecodeSettings(64)

        def decode(self, features, contexts, progress=False, adapters=None, on_token=None, na_probs=None):
            na_probs.update({f.id: 0.0 for f in features})
            self.batches.append([f.window_of for f in features])
            return {f.id: "x" for f in features}

    async def scenario():
        batcher = Batcher(Recorder(), max_batch_size=8, max_wait_ms=50)
        runner = asyncio.create_task(batcher.run())
        asked = [asyncio.create_task(batcher.answer([Feature("q\x1f0", [1], 1, window_of=("q", 0)),
                                                     Feature("q\x1f3", [2], 1, window_of=("q", 1))], doc))
                 for doc in ("document A", "document B")]
        await asyncio.wait_for(asyncio.gather(*asked), 10)
        runner.cancel()
        batcher.close()

    asyncio.run(scenario())
    [rows] = Recorder.batches  # one batch
    assert [rank for _, rank in rows] == [0, 1, 0, 1]
    assert rows[0][0] == rows[1][0] != rows[2][0] == rows[3][0]


def test_a_window_being_read_ahead_is_still_waiting():
    """``loraqa_document_read_ahead_waiting`` counts the window being read, not only those queued: a
    client that waits for 0 then finds the decoder free."""
    import asyncio

    from loraqa.inference.settings import DecodeSettings

    seen = []

    class Reader:  # stands in for Answerer: records what the gauge would say while each window is read
        adapters = None
        settings = DecodeSettings(64)

        def read_ahead(self, window, adapter):
            seen.append((window, len(self.batcher.ahead) + self.batcher.reading_ahead))
            time.sleep(0.05)

    reader = Reader()
    batcher = reader.batcher = Batcher(reader, max_batch_size=8, max_wait_ms=0)

    async def scenario():
        runner = asyncio.create_task(batcher.run())
        batcher.read_ahead(None, ["w1", "w2"])
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(seen) == 2 and not batcher.reading_ahead:
                break
        runner.cancel()
        batcher.close()

    asyncio.run(scenario())
    assert seen == [("w1", 2), ("w2", 1)] and batcher.reading_ahead == 0


def test_serve_checks_its_limits_before_loading(capsys):
    assert main(["serve", "--model", "no/such-model", "--max-batch-size", "0"]) == 2
    assert "--max-batch-size must be >= 1" in capsys.readouterr().err


def test_a_model_that_cannot_mix_adapters_gets_one_adapter_a_batch():
    import asyncio

    from loraqa.data.features import Feature
    from loraqa.inference.settings import DecodeSettings

    class Adapters:
        mixable = False

        def holds(self, handle):
            return True

    class Recorder:  # stands in for Answerer: records which adapters are decoded together
        batches = []
        adapters = Adapters()
        settings = DecodeSettings(64)

        def decode(self, features, contexts, progress=False, adapters=None, on_token=None, na_probs=None):
            na_probs.update({f.id: 0.0 for f in features})
            self.batches.append(sorted(set(adapters.values())))
            return {f.id: "x" for f in features}

    async def scenario():
        batcher = Batcher(Recorder(), max_batch_size=8, max_wait_ms=50)
        runner = asyncio.create_task(batcher.run())
        asked = [asyncio.create_task(batcher.answer([Feature("q", [i], 1)], "p", adapter=a))
                 for i, a in enumerate(["a#1", "b#2", "a#1", None])]
        await asyncio.wait_for(asyncio.gather(*asked), 10)
        runner.cancel()
        batcher.close()

    asyncio.run(scenario())
    assert all(len(b) == 1 for b in Recorder.batches) and len(Recorder.batches) == 3


def test_a_long_passage_is_read_in_windows_and_says_where_its_answer_came_from(config, examples):
    """The server answers a passage longer than a window as `ask` does, with the window; a passage
    over --max-document-tokens is a 413, one over --max-prompt-tokens no longer (a window's prompt is)."""
    from conftest import LONG_DOCUMENT, SQUAD

    from loraqa.config import load_config
    from loraqa.data.examples import Example
    from loraqa.data.squad import load_squad_file

    small = load_config(None, {**config.to_dict(), "window_tokens": 120, "doc_stride": 30})
    question = "When was the mill rebuilt?"
    expected = ask(small, None, [Example("1", "", LONG_DOCUMENT, question, ())])["1"]
    answerer = load_answerer(small, None, load_squad_file(SQUAD))
    url, stop = start_server(build_app(answerer, Limits(max_prompt_tokens=400, max_document_tokens=5000)))
    try:
        status, reply = request(f"{url}/answer", {"context": LONG_DOCUMENT, "question": question})
        assert status == 200 and reply["answer"] == expected and reply["window"]["windows_read"] == 3
        assert 0 <= reply["window"]["start"] < reply["window"]["end"] <= len(LONG_DOCUMENT)
        if reply["start"] is not None:
            assert LONG_DOCUMENT[reply["start"]:reply["end"]] == reply["answer"]
        first = reply
        status, reply = request(f"{url}/answer", {"context": LONG_DOCUMENT, "question": question})
        same = {k: v for k, v in reply.items() if k != "seconds"}
        assert status == 200 and same == {k: v for k, v in first.items() if k != "seconds"}  # windows from the cache
        status, reply = request(f"{url}/answer", {"context": LONG_DOCUMENT * 3, "question": question})
        assert status == 413 and "--max-document-tokens 5,000" in reply["error"]
        metrics = urllib.request.urlopen(f"{url}/metrics").read().decode()
        hits = next(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("loraqa_document_cache_hits_total"))
        assert hits >= 1 and "loraqa_document_cache_bytes" in metrics
    finally:
        stop()


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics").read().decode()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_a_documents_other_windows_are_read_ahead_so_the_next_question_reads_none(config):
    """After a question about a long document, the idle server reads the document's other windows
    (within the cache's budget), so another question about it prefills only its own tokens."""
    from conftest import LONG_DOCUMENT, SQUAD

    from loraqa.data.squad import load_squad_file

    small = load_config(None, {**config.to_dict(), "window_tokens": 120, "doc_stride": 30})
    answerer = load_answerer(small, None, load_squad_file(SQUAD))
    url, stop = start_server(build_app(answerer, Limits(max_prompt_tokens=400)))
    try:
        status, first = request(f"{url}/answer", {"context": LONG_DOCUMENT, "question": "When was the mill rebuilt?"})
        assert status == 200
        windows = answerer.passages.misses
        deadline = time.monotonic() + 60
        while _metric(url, "loraqa_document_cache_read_ahead_total") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        while answerer.passages.ahead and time.monotonic() < deadline:  # until the queue is read
            before = answerer.passages.ahead
            time.sleep(0.3)
            if answerer.passages.ahead == before:
                break
        kept = len(answerer.passages.entries)
        assert kept > windows and _metric(url, "loraqa_document_cache_windows") == kept
        misses = answerer.passages.misses
        status, second = request(f"{url}/answer", {"context": LONG_DOCUMENT, "question": "Which roads are old?"})
        assert status == 200 and answerer.passages.misses == misses  # every window it read was kept
        assert answerer.passages.hits >= 1
    finally:
        stop()


def test_no_read_ahead_and_no_cache_when_turned_off(config):
    from conftest import LONG_DOCUMENT, SQUAD

    from loraqa.data.squad import load_squad_file

    small = load_config(None, {**config.to_dict(), "window_tokens": 120, "doc_stride": 30})
    answerer = load_answerer(small, None, load_squad_file(SQUAD))
    url, stop = start_server(build_app(answerer, Limits(max_prompt_tokens=400, document_cache_mb=0)))
    try:
        status, _ = request(f"{url}/answer", {"context": LONG_DOCUMENT, "question": "When was the mill rebuilt?"})
        assert status == 200 and answerer.passages is None
        assert "loraqa_document_cache" not in urllib.request.urlopen(f"{url}/metrics").read().decode()
    finally:
        stop()
