
import pytest

from loraqa.config import DEFAULT_TEMPLATE, Config, load_config, presets

CONFIGS = sorted(presets())


def test_defaults_are_the_write_ups_recipe():
    c = Config()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.batch_size, c.lr, c.epochs) == (8, 16.0, 0.1, 4, 2e-4, 3)
    assert c.template == DEFAULT_TEMPLATE and c.method == "lora"


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 1\nlr: 0.001\ntarget_modules: [c_attn, c_proj]\n")
    c = load_config(path, {"lr": 0.005})
    assert (c.epochs, c.lr, c.target_modules) == (1, 0.005, ["c_attn", "c_proj"])
    assert load_config(None, {"target_modules": "q_proj, v_proj"}).target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("overrides, message", [
    ({"epoch": 3}, "unknown keys in settings: epoch"),
    ({"r": 0}, "--r must be >= 1"),
    ({"lora_dropout": 1.5}, "--lora-dropout must be in"),
    ({"method": "qlora"}, "--method must be one of"),
    ({"template": "Context: {context}\nAnswer:"}, "--template must contain {question} exactly once"),
    ({"max_length": 0}, "--max-length must be >= 1"),
    ({"draft_tokens": -1}, "--draft-tokens must be >= 0"),
])
def test_bad_settings_name_the_flag(overrides, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_config(None, overrides)


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match=f"unknown keys in config file {path}: learning_rate"):
        load_config(path)


def test_presets_ship_in_the_package():
    assert {"recommended", "best", "gpt2-squad", "cpu-small", "compare-cpu", "compare-gpt2"} <= set(CONFIGS)


@pytest.mark.parametrize("path", CONFIGS)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_the_write_up_preset_is_the_write_ups_recipe():
    c = load_config("gpt2-squad")  # by name, from any folder
    assert (c.model, c.r, c.lora_alpha, c.lora_dropout, c.batch_size, c.lr, c.epochs) == ("gpt2", 8, 16, 0.1, 4, 2e-4, 3)
    assert c.train_file is None and c.max_train_examples is None  # full SQuAD from the hub


def test_numbers_written_as_text_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 2e-5\nepochs: '2'\n")  # YAML 1.1 reads 2e-5 (no dot) as a string
    c = load_config(path)
    assert c.lr == 2e-5 and isinstance(c.lr, float) and c.epochs == 2
    with pytest.raises(ValueError, match="setting epochs must be int, got 'two'"):
        load_config(None, {"epochs": "two"})
    with pytest.raises(ValueError, match="setting epochs must be int, got 1.5"):
        load_config(None, {"epochs": 1.5})
