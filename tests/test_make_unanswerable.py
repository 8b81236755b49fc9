"""scripts/make_unanswerable.py: questions moved to a passage of their article that lacks their answers."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import SQUAD
from loraqa.data.load import load_examples

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from make_unanswerable import answerable_only, make_unanswerable, mentions  # noqa: E402

V1 = json.loads(SQUAD.read_text())


def test_mentions_uses_the_official_normalisation():
    assert mentions("Rebuilt by THE Müller family, in 1820.", "Müller family")
    assert mentions("It was 1820.", "1820") and not mentions("In 18201 it was.", "1820")


def test_every_moved_question_lands_in_a_passage_without_its_answers():
    v2, counts = make_unanswerable(V1, fraction=1.0, seed=0)
    golds = {qa["id"]: [a["text"] for a in qa["answers"]]
             for a in V1["data"] for p in a["paragraphs"] for qa in p["qas"]}
    seen = []
    for article in v2["data"]:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                seen.append(qa["id"])
                if qa.get("is_impossible"):
                    assert qa["answers"] == [] and not any(mentions(p["context"], g) for g in golds[qa["id"]])
    assert sorted(seen) == sorted(golds)  # every question once
    # the Broncos article has one passage: its 3 questions stay answerable
    assert counts == {"questions": 6, "unanswerable": 3, "kept_no_other_passage": 3}
    assert make_unanswerable(V1, fraction=1.0, seed=0)[0] == v2  # seeded
    assert make_unanswerable(V1, fraction=0.0, seed=0)[1]["unanswerable"] == 0


def test_script_writes_a_v2_file_and_its_answerable_part(tmp_path):
    out, answerable = tmp_path / "v2.json", tmp_path / "v1.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_unanswerable.py"), str(SQUAD), str(out),
                           "--fraction", "1", "--answerable-out", str(answerable)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "6 questions, 3 made unanswerable, 3 kept answerable" in done.stdout
    examples = load_examples(str(out), "validation")
    assert json.loads(out.read_text())["version"] == "v2.0" and sum(not e.answerable for e in examples) == 3
    assert [e.id for e in load_examples(str(answerable), "validation")] == [e.id for e in examples if e.answerable]
    assert answerable_only(json.loads(out.read_text()))["version"] == "1.1"
