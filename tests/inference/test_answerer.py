import json

import torch

from loraqa.cli import main
from loraqa.model.lora import add_lora, load_adapter
from loraqa.model.load import load_model


def _adapter(tiny_model_dir, folder):
    torch.manual_seed(0)
    model = add_lora(load_model(str(tiny_model_dir)), lora_dropout=0.0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(folder)
    return folder


def test_merge_writes_a_plain_model_with_the_adapters_outputs(tiny_model_dir, tmp_path):
    adapter = _adapter(tiny_model_dir, tmp_path / "adapter")
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter),
                 "--output-dir", str(tmp_path / "merged")]) == 0
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    ids = torch.tensor([[3, 17, 42, 99, 5, 7]])
    with torch.no_grad():
        merged = load_model(str(tmp_path / "merged"))(input_ids=ids).logits
        unmerged = load_adapter(load_model(str(tiny_model_dir)), adapter).eval()(input_ids=ids).logits
        base = load_model(str(tiny_model_dir))(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base, unmerged, atol=1e-3)


def test_ask_one_and_many(tiny_model_dir, tmp_path, capsys):
    adapter = _adapter(tiny_model_dir, tmp_path / "adapter")
    common = ["--model", str(tiny_model_dir), "--adapter", str(adapter), "--max-new-tokens", "5", "--precision", "fp32"]
    assert main(["ask", *common, "--context", "The mill was rebuilt in 1887.", "--question", "When?"]) == 0
    single = capsys.readouterr().out.rstrip("\n")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "a", "context": "The mill was rebuilt in 1887.", "question": "When?"}) + "\n"
                         + json.dumps({"context": "Denver won.", "question": "Who won?"}) + "\n")
    assert main(["ask", *common, "--input", str(questions), "--output", str(tmp_path / "a.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "2"]
    assert rows[0]["answer"] == single  # batched answers equal the one-question answer


def test_ask_needs_a_question_and_a_context(tiny_model_dir, capsys):
    assert main(["ask", "--model", str(tiny_model_dir), "--question", "Who?"]) == 2
    assert "give --question with --context" in capsys.readouterr().err
