"""Every answer from the adapter it names: a request admitted for one load of an adapter is answered
by that load or refused (404), never by the base or a later load of the same name; an adapter trained
in other prompt settings than the server answers with is refused in one line; loads stay under
``--adapter-root`` and say nothing of the server's disk; a damaged adapter is a counted 400."""

import asyncio
import json

import pytest
from conftest import SQUAD, make_adapter, request, start_server

from loraqa.config import load_config
from loraqa.data.squad import load_squad_file
from loraqa.inference.answerer import ask, load_answerer
from loraqa.model.multilora import BASE
from loraqa.serve.access import Access
from loraqa.serve.app import build_app
from loraqa.serve.batcher import Batcher
from loraqa.serve.request import RequestError
from loraqa.serve.server import served_adapters
from loraqa.serve.service import Limits

ADMIN = "admin-secret"


@pytest.fixture(scope="module")
def config(tiny_llama_dir):
    return load_config(None, {"model": str(tiny_llama_dir), "precision": "fp32", "max_new_tokens": 6})


@pytest.fixture(scope="module")
def root(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("root")
    for seed, name in enumerate("ab", 1):
        make_adapter(tiny_llama_dir, folder / name, seed)
    return folder


def test_a_request_admitted_before_an_unload_is_refused_not_answered_by_the_base(config, root):
    examples = load_squad_file(SQUAD)
    answerer = load_answerer(config, None, examples, named=[("a", str(root / "a"))])
    features, _ = answerer.features(examples[:3])
    contexts = [ex.context for ex in examples[:3]]
    base = answerer.decode(features, dict(zip([f.id for f in features], contexts)),
                           adapters={f.id: BASE for f in features})

    async def scenario():
        batcher = Batcher(answerer, max_batch_size=8, max_wait_ms=0)
        runner = asyncio.create_task(batcher.run())
        try:
            admitted = answerer.adapters.handle("a")  # the request is admitted ...
            # ... then, before it reaches the batcher, "a" is unloaded and loaded again under the same name
            answerer.adapters.detach(answerer.adapters.retire("a"))
            answerer.attach(answerer.adapters.read("a", str(root / "a")))
            assert answerer.adapters.handle("a") != admitted
            with pytest.raises(RequestError) as refused:
                await asyncio.wait_for(batcher.answer(features, contexts[0], contexts, admitted), 30)
            current = await asyncio.wait_for(batcher.answer(features, contexts[0], contexts,
                                                            answerer.adapters.handle("a")), 30)
            return refused.value, current
        finally:
            runner.cancel()
            batcher.close()

    refused, current = asyncio.run(scenario())
    assert refused.status == 404 and "'a' was unloaded" in refused.reason
    assert current != [base[f.id] for f in features]  # the new load answers as an adapter, not as the base


def test_an_adapter_in_other_prompt_settings_than_the_servers_is_refused(config, root, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(root / "a", other)
    (other / "loraqa.json").write_text(json.dumps({"template": "Q: {question} C: {context} A:"}))
    answerer = load_answerer(config, None, load_squad_file(SQUAD), named=[])
    with pytest.raises(ValueError, match="other prompt settings than this server answers with") as e:
        answerer.adapters.read("other", str(other))  # the first adapter too: compared with the server's
    assert "\n" not in str(e.value) and "template" in str(e.value)
    flagged = load_config(None, {"model": config.model, "template": "Q: {question} C: {context} A:"})
    assert served_adapters(flagged, [str(other)], None) == (str(other), None)  # the flag and the adapter agree
    with pytest.raises(ValueError, match="other prompt settings"):
        served_adapters(config, [str(other)], None)  # --template (here: the default) would override its own


@pytest.fixture(scope="module")
def server(config, root):
    answerer = load_answerer(config, None, load_squad_file(SQUAD), named=[("a", str(root / "a"))])
    url, stop = start_server(build_app(answerer, Limits(max_wait_ms=20), access=Access(admin_key=ADMIN),
                                       adapter_root=str(root)))
    yield url
    stop()


def _load(url, name, path):
    return request(f"{url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": path},
                   {"Authorization": f"Bearer {ADMIN}"})


def test_loads_stay_under_the_root_and_say_nothing_of_the_disk(server, root):
    status, reply = _load(server, "x", str(root.parent))
    assert status == 403 and "outside this server's --adapter-root" in reply["error"]
    status, reply = _load(server, "up", "../")
    assert status == 403
    status, reply = _load(server, "missing", "no-such-folder")
    assert status == 400 and "no-such-folder" in reply["error"] and str(root) not in reply["error"]
    status, reply = _load(server, "b", "b")  # relative to the root
    assert status == 200 and "b" in reply["models"]
    status, models = request(f"{server}/v1/models")
    assert status == 200 and str(root) not in json.dumps(models)
    status, one = request(f"{server}/v1/models/b")
    assert status == 200 and one["id"] == "b" and one["parent"] == models["data"][0]["id"]
    assert request(f"{server}/v1/models/nobody")[0] == 404


def test_a_damaged_adapter_is_a_counted_400_not_a_500(server, root):
    import shutil

    damaged = root / "damaged"
    shutil.copytree(root / "a", damaged)
    (damaged / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    status, reply = _load(server, "damaged", "damaged")
    assert status == 400 and "could not be read" in reply["error"] and str(root) not in reply["error"]
    import urllib.request

    with urllib.request.urlopen(f"{server}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'loraqa_responses_4xx_total{code="400"}' in text


def test_opt_all_linear_adapters_mixed_over_http_answer_as_each_alone(tmp_path):
    """The review's case: a tiny OPT (its MLP sees (tokens, width)) served with two all-linear
    adapters, 16 concurrent /v1/completions for the base and one adapter, each equal to `ask`."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import build_tokenizer, save_family_adapter
    from families import FAMILIES

    family = next(f for f in FAMILIES if f.id == "opt")
    tokenizer = build_tokenizer()
    family.build(tokenizer).save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    paths = {n: save_family_adapter(family, tokenizer, tmp_path / n, seed) for seed, n in enumerate("ab", 1)}
    config = load_config(None, {"model": str(tmp_path / "opt"), "precision": "fp32", "max_new_tokens": 6})
    examples = load_squad_file(SQUAD)[:8]
    expected = {None: ask(config, None, examples), "a": ask(config, paths["a"], examples)}
    answerer = load_answerer(config, None, examples, named=list(paths.items()))
    url, stop = start_server(build_app(answerer, Limits(max_batch_size=16, max_wait_ms=100)))
    asks = [(ex, name) for ex in examples for name in (None, "a")]
    try:
        with ThreadPoolExecutor(len(asks)) as pool:
            replies = list(pool.map(lambda p: request(f"{url}/v1/completions", {
                "model": p[1] or config.model, "prompt": _template(p[0])}), asks))
    finally:
        stop()
    got = [reply["choices"][0]["text"] for _, reply in replies]
    assert got == [expected[name][ex.id] for ex, name in asks]
    assert len(set(got)) > 2  # answers that differ: the comparison can fail


def _template(ex):
    from loraqa.data.prompt import format_prompt

    return format_prompt("Context: {context}\nQuestion: {question}\nAnswer:", ex.context, ex.question)
