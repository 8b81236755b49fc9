"""The recipes in examples/ (LangChain, LlamaIndex, Haystack over a folder of text files, BM25
retrievers, loraqa serve as the model) run offline end to end, where the frameworks are installed
(pip install -e '.[frameworks]'; CI replays their recorded requests instead: tests/serve/test_qa_forms.py)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import start_server

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NEEDS = {"langchain_qa.py": ["langchain_community", "langchain_openai", "rank_bm25"],
         "llamaindex_qa.py": ["llama_index.core", "llama_index.retrievers.bm25", "llama_index.llms.openai_like"],
         "haystack_qa.py": ["haystack"]}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("recipe", sorted(NEEDS))
def test_a_recipe_answers_from_a_folder_through_the_server(recipe, tiny_model_dir, examples, tmp_path):
    missing = [m for m in NEEDS[recipe] if not _installed(m)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: pip install -e '.[frameworks]'")
    from loraqa.config import load_config
    from loraqa.inference.answerer import load_answerer
    from loraqa.serve.app import build_app
    from loraqa.serve.service import Limits

    folder = tmp_path / "notes"
    folder.mkdir()
    for n, ex in enumerate(examples[:6]):
        (folder / f"note{n}.txt").write_text(ex.context)
    answerer = load_answerer(load_config(None, {"model": str(tiny_model_dir), "max_new_tokens": 4}), None, examples)
    url, stop = start_server(build_app(answerer, Limits()))
    try:
        done = subprocess.run([sys.executable, str(EXAMPLES / recipe), "--folder", str(folder), "--question",
                               examples[0].question, "--url", f"{url}/v1"], capture_output=True, text=True, timeout=300)
    finally:
        stop()
    assert done.returncode == 0, done.stderr[-1500:]
    assert "sources: note" in done.stdout
