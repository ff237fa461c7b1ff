"""Config tree: YAML recipes, dotted overrides, validation with did-you-mean errors."""

from pathlib import Path

import pytest
import yaml

from lmforge.config import config_from_dict, dump_yaml, load_config, to_dict
from lmforge.errors import UserError
from lmforge.models.config import ModelConfig

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["nano", "small", "gpt2-124m", "llama-tiny", "demo"])
def test_presets_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.n_embd % cfg.model.n_head == 0


def test_preset_shapes_match_the_issue():
    nano = load_config(CONFIGS / "nano.yaml")
    assert (nano.model.n_layer, nano.model.n_head, nano.model.n_embd, nano.model.block_size,
            nano.train.batch_size) == (4, 4, 128, 64, 12)
    small = load_config(CONFIGS / "small.yaml")
    assert (small.model.n_layer, small.model.n_head, small.model.n_embd, small.model.block_size,
            small.train.batch_size) == (6, 6, 384, 256, 16)
    llama = load_config(CONFIGS / "llama-tiny.yaml").model
    assert (llama.pos_encoding, llama.norm, llama.mlp) == ("rope", "rmsnorm", "swiglu")
    assert llama.kv_heads < llama.n_head


def test_overrides_are_typed():
    cfg = load_config(CONFIGS / "nano.yaml", ["model.n_layer=6", "train.lr=3e-4", "train.compile=true",
                                              "model.n_kv_head=2", "train.precision=bf16"])
    assert cfg.model.n_layer == 6 and cfg.train.lr == 3e-4 and cfg.train.compile is True
    assert cfg.model.n_kv_head == 2 and cfg.train.precision == "bf16"
    assert isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("override, expected", [
    ("model.n_layers=3", "did you mean model.n_layer?"),
    ("train.lrr=1", "did you mean train.lr?"),
    ("trian.lr=1", "did you mean train.lr?"),
    ("train.warmup=10", "did you mean train.warmup_steps?"),
    ("n_embd=64", "did you mean model.n_embd?"),
])
def test_unknown_key_names_the_closest(override, expected):
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, fragment", [
    ("train.batch_size=abc", "train.batch_size"),
    ("train.precision=fp8", "train.precision"),
    ("train.parallel=zero", "train.parallel"),
    ("model.n_head=5", "model.n_head"),
    ("model.n_kv_head=3", "model.n_kv_head"),
    ("model.pos_encoding=alibi", "model.pos_encoding"),
    ("train.min_lr=1", "train.min_lr"),
    ("train.max_steps=0", "train.max_steps"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(UserError, match=fragment.replace(".", r"\.")):
        load_config(None, [override])


def test_typo_in_yaml_file_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  n_layr: 3\n")
    with pytest.raises(UserError) as e:
        load_config(f)
    assert str(f) in str(e.value) and "model.n_layer" in str(e.value)


def test_invalid_yaml_names_the_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  n_layer: [3\n")
    with pytest.raises(UserError, match="line"):
        load_config(f)


def test_resolved_config_round_trips():
    cfg = load_config(CONFIGS / "llama-tiny.yaml", ["train.lr=5e-4"])
    again = config_from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert to_dict(again) == to_dict(cfg)
    assert ModelConfig.from_dict(to_dict(cfg)["model"]) == cfg.model


def test_a_preset_name_is_found_from_any_directory(tmp_path, monkeypatch):
    """`lmforge pretrain nano` works outside the repository root too; an unknown name lists the presets."""
    from lmforge.config import find_preset

    monkeypatch.chdir(tmp_path)
    assert find_preset("nano").resolve() == (REPO_CONFIGS / "nano.yaml").resolve()
    (tmp_path / "nano").mkdir()  # e.g. a run's --out: a directory is not a recipe
    assert find_preset("nano").resolve() == (REPO_CONFIGS / "nano.yaml").resolve()
    assert load_config("moe-tiny").model.moe.num_experts == 8
    with pytest.raises(UserError, match=r"config nanox is neither a file nor a preset; presets: .*bert-mini.*nano"):
        load_config("nanox")
