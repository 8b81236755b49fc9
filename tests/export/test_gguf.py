"""loraqa export: GGUF files that read back as the model they came from (through transformers'
GGUF loader here, through llama.cpp where llama-cpp-python is installed)."""


import gguf
import numpy as np
import pytest
import torch

from conftest import SQUAD, build_tokenizer, save_tiny_model
from loraqa.cli import main
from loraqa.export.writer import write_model
from loraqa.model.load import load_model, load_tokenizer

HARD = ["Hello world", " leading space", "  two spaces", "digits 1234567 3.14 2024-11-30", "unicode: café naïve 東京 🚀",
        "new\nlines\n\n  indented\n", "tabs\tand\r\nreturns", "Context: x\nQuestion: y?\nAnswer:", "<|endoftext|> inside"]


def _tiny(arch: str, folder):
    """conftest's tiny ``arch`` model saved to ``folder``: GPT-2 with 1024 positions, as transformers'
    GGUF reader takes GPT-2's context length as 1024; the Llama has grouped-query attention and a tied
    head, what the q/k permutation and the missing output.weight must get right."""
    return save_tiny_model(folder, arch, n_positions=1024 if arch == "gpt2" else 512)


def _adapter(model_dir, folder, **lora):
    """A LoRA on every linear layer with non-zero B; ``lora``: LoraConfig's settings (r, alpha, rsLoRA, patterns)."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    base = load_model(str(model_dir))
    conv = any(isinstance(m, Conv1D) for m in base.modules())
    model = get_peft_model(base, LoraConfig(lora_dropout=0.0, target_modules="all-linear", fan_in_fan_out=conv, **lora))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(folder)
    return folder


def _logits(model, tokenizer, text="Context: the mill was rebuilt\nQuestion: when?\nAnswer:"):
    with torch.no_grad():
        return model(tokenizer(text, return_tensors="pt").input_ids).logits[0]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_an_f32_file_reads_back_as_the_same_model_and_tokenizer(arch, tmp_path):
    model, tok = _tiny(arch, tmp_path / "m")
    path = write_model(model, tok, tmp_path / "m.gguf", "f32", progress=False)
    back, back_tok = load_model(str(path)).eval(), load_tokenizer(str(path))
    # q/k permuted and back, Conv1D transposed and back: the same weights (a transposed copy may take another
    # kernel, so the last bits of a product may differ)
    torch.testing.assert_close(_logits(back, tok), _logits(model, tok), atol=1e-5, rtol=0)
    for text in HARD:
        assert back_tok(text)["input_ids"] == tok(text)["input_ids"], text
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2" and fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert ("output.weight" in names) == (arch == "gpt2")  # llama: the tied head is token_embd itself


@pytest.mark.parametrize("outtype, qtype", [("f16", "F16"), ("q8_0", "Q8_0")])
def test_smaller_types_store_matrices_in_them_and_norms_in_f32(outtype, qtype, tmp_path):
    model, tok = _tiny("llama", tmp_path / "m")
    path = write_model(model, tok, tmp_path / "m.gguf", outtype, progress=False)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == qtype and types["blk.0.attn_norm.weight"] == "F32"
    back = load_model(str(path)).eval()
    ours, theirs = _logits(model, tok), _logits(back, tok)
    assert torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0) > 0.99  # q8_0: ~0.998 on this random model


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merged_export_answers_as_base_plus_adapter(arch, tmp_path):
    from loraqa.config import Config
    from loraqa.data.squad import load_squad_file
    from loraqa.inference.answerer import ask

    _tiny(arch, tmp_path / "m")
    adapter = _adapter(tmp_path / "m", tmp_path / "adapter")
    out = tmp_path / "out" / "model.gguf"
    assert main(["export", "--model", str(tmp_path / "m"), "--adapter", str(adapter), "--output", str(out),
                 "--outtype", "f32", "--quiet"]) == 0
    examples = load_squad_file(SQUAD)
    settings = {"max_new_tokens": 6, "precision": "fp32", "max_length": 256}
    with_adapter = ask(Config(model=str(tmp_path / "m"), **settings), str(adapter), examples)
    exported = ask(Config(model=str(out), **settings), None, examples)
    base = ask(Config(model=str(tmp_path / "m"), **settings), None, examples)
    assert exported == with_adapter and exported != base  # the adapter is in the file, and it changes answers
    text = (tmp_path / "out" / "model.Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n") and 'PARAMETER stop "\\n"' in text
    assert 'TEMPLATE """Context: {{ .System }}\nQuestion: {{ .Prompt }}\nAnswer:"""' in text


@pytest.mark.parametrize("arch, lora", [
    ("gpt2", {}),
    ("llama", {"use_rslora": True}),  # alpha / sqrt(r)
    ("llama", {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 24.0}}),  # per-layer rank and alpha
], ids=["gpt2", "llama-rslora", "llama-patterns"])
def test_adapter_only_plus_the_base_file_is_the_merged_file(arch, lora, tmp_path):
    """llama.cpp adds scale * B @ A (scale = alpha / the tensor's own rank) to each named weight: done
    here by hand with the adapter file's tensors on the base file's weights, it gives the merged file's
    weights, whatever scale PEFT gave each layer (folded into B where it is not alpha / r)."""
    _tiny(arch, tmp_path / "m")
    adapter = _adapter(tmp_path / "m", tmp_path / "adapter", r=4, lora_alpha=8.0, **lora)
    m = str(tmp_path / "m")
    for argv in (["--output", str(tmp_path / "base.gguf")],
                 ["--adapter", str(adapter), "--output", str(tmp_path / "merged.gguf")],
                 ["--adapter", str(adapter), "--adapter-only", "--output", str(tmp_path / "lora.gguf"),
                  "--base-gguf", str(tmp_path / "base.gguf")]):
        assert main(["export", "--model", m, "--outtype", "f32", "--quiet", *argv]) == 0
    read = {name: gguf.GGUFReader(tmp_path / f"{name}.gguf") for name in ("base", "merged", "lora")}
    weights = {name: {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)])
                      for t in r.tensors} for name, r in read.items()}
    fields = read["lora"].fields
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    alpha = fields["adapter.lora.alpha"].contents()
    assert alpha == pytest.approx(8.0)  # the adapter's own: each layer's other scale is in its B
    adapted = {n[:-len(".lora_a")] for n in weights["lora"] if n.endswith(".lora_a")}
    ranks = {weights["lora"][n + ".lora_a"].shape[0] for n in adapted}
    assert ranks == ({2, 4} if "rank_pattern" in lora else {4})
    assert len(adapted) == 2 * (4 if arch == "gpt2" else 7)
    for name, merged in weights["merged"].items():
        expect = weights["base"][name]
        if name in adapted:
            a, b = weights["lora"][name + ".lora_a"], weights["lora"][name + ".lora_b"]
            expect = expect + alpha / a.shape[0] * (b @ a)  # llama.cpp: the rank of this tensor
        np.testing.assert_allclose(merged, expect, atol=1e-5, err_msg=name)
    modelfile = (tmp_path / "lora.Modelfile").read_text()
    assert modelfile.startswith("FROM ./base.gguf\nADAPTER ./lora.gguf\n")


def test_what_cannot_be_exported_is_refused_in_one_line(tiny_model_dir, tmp_path, capsys):
    from conftest import make_adapter

    out = str(tmp_path / "x.gguf")
    assert main(["export", "--model", str(tiny_model_dir), "--method", "span", "--output", out]) == 2
    assert "not a causal LM" in capsys.readouterr().err
    assert main(["export", "--model", str(tiny_model_dir), "--output", str(tmp_path / "x.bin")]) == 2
    assert "ending in .gguf" in capsys.readouterr().err
    assert main(["export", "--model", str(tiny_model_dir), "--adapter-only", "--output", out]) == 2
    assert "--adapter-only needs --adapter" in capsys.readouterr().err

    from transformers import GPTNeoConfig, GPTNeoForCausalLM
    GPTNeoForCausalLM(GPTNeoConfig(vocab_size=400, hidden_size=32, num_layers=2, num_heads=2,
                                   attention_types=[[["global"], 2]])).save_pretrained(tmp_path / "neo")
    build_tokenizer().save_pretrained(tmp_path / "neo")
    capsys.readouterr()  # the save's own progress bar
    assert main(["export", "--model", str(tmp_path / "neo"), "--output", out]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # one line, no traceback
    assert line == "loraqa export: error: export writes GGUF for the architectures gpt2, llama; this model is 'gpt_neo'"

    from peft import LoraConfig, get_peft_model
    dora = get_peft_model(load_model(str(tiny_model_dir)), LoraConfig(target_modules=["c_attn"], use_dora=True,
                                                                      fan_in_fan_out=True))
    dora.save_pretrained(tmp_path / "dora")
    assert main(["export", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "dora"), "--adapter-only",
                 "--output", out]) == 2
    assert "DoRA" in capsys.readouterr().err
    assert main(["export", "--model", str(tiny_model_dir), "--adapter", str(make_adapter(tiny_model_dir, tmp_path / "a")),
                 "--adapter-only", "--output", out]) == 0  # a plain LoRA is fine
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written left behind




def test_a_head_width_of_its_own_is_written_and_reads_back(tmp_path):
    """A Llama whose head_dim is not hidden / heads (Qwen3, Gemma do this): llama.cpp needs
    attention.key_length / value_length, or it takes hidden / heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=32, num_hidden_layers=2, intermediate_size=128,
                                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).eval()
    path = write_model(model, tok, tmp_path / "wide.gguf", "f32", progress=False)
    fields = gguf.GGUFReader(path).fields
    assert fields["llama.attention.key_length"].contents() == 32 == fields["llama.attention.value_length"].contents()
    torch.testing.assert_close(_logits(load_model(str(path)).eval(), tok), _logits(model, tok), atol=1e-5, rtol=0)
    _, plain_tok = _tiny("llama", tmp_path / "plain")
    plain = write_model(load_model(str(tmp_path / "plain")), plain_tok, tmp_path / "plain.gguf", "f32", progress=False)
    assert "llama.attention.key_length" not in gguf.GGUFReader(plain).fields  # hidden / heads: llama.cpp's own default


def test_a_template_with_other_braces_exports_and_fills_as_prompts_do(tiny_model_dir, tmp_path, capsys):
    template = 'Context: {context}\nJSON like {"k": 1} stays\nQuestion: {question}\nAnswer:'
    assert main(["export", "--model", str(tiny_model_dir), "--outtype", "f32", "--template", template,
                 "--output", str(tmp_path / "m.gguf"), "--quiet"]) == 0
    modelfile = (tmp_path / "m.Modelfile").read_text()
    assert 'TEMPLATE """Context: {{ .System }}\nJSON like {"k": 1} stays\nQuestion: {{ .Prompt }}\nAnswer:"""' in modelfile
    out = capsys.readouterr().out
    assert 'JSON like {\\"k\\": 1} stays' in out and "The mill was rebuilt in 1887." in out  # the example, filled
