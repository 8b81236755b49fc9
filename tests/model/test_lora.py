import pytest
import torch

from conftest import SHARED, make_adapter, needs_shared
from loraqa.cli import main
from loraqa.config import load_config
from loraqa.model.lora import add_lora, default_target_modules, load_adapter, parameter_counts, prepare_model
from loraqa.model.load import count_parameters, load_model


def test_gpt2_defaults_to_c_attn_with_fan_in_fan_out(tiny_model):
    assert default_target_modules(tiny_model) == ["c_attn"]
    model = add_lora(tiny_model)
    assert model.peft_config["default"].fan_in_fan_out is True  # c_attn is a Conv1D


def test_exact_lora_count_and_only_lora_trains(tiny_model):
    base_total = count_parameters(tiny_model)[1]
    model = add_lora(tiny_model, r=8)
    # per layer: A (8 x 32) + B (3*32 x 8) on c_attn; 2 layers
    assert parameter_counts(model, base_total)["trainable_params"] == 2 * 8 * (32 + 96)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert count_parameters(model)[1] == base_total + 2 * 8 * (32 + 96)


def test_full_method_trains_every_weight(tiny_model):
    total = count_parameters(tiny_model)[1]
    model = prepare_model(tiny_model, load_config(None, {"method": "full"}))
    assert parameter_counts(model, total) == {"trainable_params": total, "total_params": total,
                                              "trainable_percent": 100.0}


def test_targets_that_match_nothing_are_an_error(tiny_model):
    with pytest.raises(ValueError, match="--target-modules q_proj match no module of gpt2; names there include: .*c_attn"):
        add_lora(tiny_model, target_modules=["q_proj"])


def test_merged_equals_unmerged_and_saved_equals_live(tiny_model, tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    model = add_lora(tiny_model, lora_dropout=0.0)
    for n, p in model.named_parameters():  # B starts at zero: make the adapter do something
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    model.eval()
    ids = torch.tensor([[3, 17, 42, 99, 5]])
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        base = model.get_base_model()
        with model.disable_adapter():
            assert not torch.allclose(model(input_ids=ids).logits, unmerged, atol=1e-4)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_adapter(load_model(str(tiny_model_dir)), tmp_path / "adapter")
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, unmerged)
        torch.testing.assert_close(merged(input_ids=ids).logits, unmerged, atol=1e-5, rtol=1e-5)
    assert base is merged


@needs_shared
def test_gpt2_small_count_is_the_write_ups():
    model = load_model(str(SHARED / "gpt2"), init="random")
    base_total = count_parameters(model)[1]
    counts = parameter_counts(add_lora(model), base_total)
    assert (counts["trainable_params"], counts["total_params"]) == (294_912, 124_439_808)


def test_all_linear_targets_every_linear_layer_but_the_head(tiny_model):
    model = add_lora(tiny_model, r=2, target_modules=["all-linear"])
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"c_attn", "c_proj", "c_fc"}  # attention in/out and both MLP layers
    assert not hasattr(model.get_output_embeddings(), "lora_A")


def test_rslora_scales_by_sqrt_rank(tiny_model):
    model = add_lora(tiny_model, r=4, lora_alpha=8, use_rslora=True)
    layer = next(m for m in model.modules() if hasattr(m, "lora_A"))
    assert layer.scaling["default"] == pytest.approx(8 / 4 ** 0.5)  # plain LoRA: 8 / 4


def test_merge_writes_a_plain_model_with_the_adapters_outputs(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
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
