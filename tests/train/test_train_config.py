"""Run configs: TOML + --set overrides, checked key by key; the shipped configs load."""

from __future__ import annotations

import pytest

from iunet3d.train.config import TrainingConfig, load_training_config
from iunet3d.train.toml_config import ConfigError, parse_override, to_toml
from tests.helpers.train import REPO


def write(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


MINIMAL = '[data]\ndataset = "/data/ct"\n'


@pytest.mark.parametrize("name", ["demo.toml", "ct_anisotropic.toml"])
def test_the_shipped_configs_load_and_round_trip_through_toml(name, tmp_path):
    config = load_training_config(REPO / "configs" / name)
    assert isinstance(config, TrainingConfig)
    again = load_training_config(write(tmp_path, to_toml(config)))
    assert again == config


def test_the_realistic_config_is_anisotropic_and_multi_gpu_ready():
    config = load_training_config(REPO / "configs" / "ct_anisotropic.toml")
    assert config.model.resampling_stride[0] == (1, 2, 2)  # thick slices: no downsampling along z first
    assert config.data.patch_size[0] < config.data.patch_size[1]
    assert config.train.precision == "bf16" and config.train.device == "auto"


def test_overrides_replace_file_values_and_are_typed(tmp_path):
    config = load_training_config(
        write(tmp_path, MINIMAL + "[train]\nsteps = 10\n"),
        ["train.steps=25", "run.dir=/scratch/runs/a b", "data.patch_size=[16, 64, 64]", "train.lr=3e-4",
         "wandb.tags=['x', 'y']", "data.validation_cases=0.25", "data.validation_cases=3"],
    )  # fmt: skip
    assert config.train.steps == 25
    assert config.run.dir == "/scratch/runs/a b"  # a bare path is read as a string
    assert config.data.patch_size == (16, 64, 64) and isinstance(config.data.patch_size, tuple)
    assert config.train.lr == 3e-4
    assert config.wandb.tags == ("x", "y")
    assert config.data.validation_cases == 3  # the later override wins; an int is a count


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        (MINIMAL + "[train]\nstep = 10\n", [], "unknown key train.step"),
        (MINIMAL + "[trian]\nsteps = 10\n", [], "unknown section 'trian'"),
        (MINIMAL, ["train.bogus=1"], "--set train.bogus=1: unknown key train.bogus"),
        (MINIMAL, ["nosection=1"], "expected section.key=value"),
        (MINIMAL, ["train.steps=ten"], "train.steps: expected an integer, got 'ten'"),
        (MINIMAL, ["train.steps=1.5"], "train.steps: expected an integer"),
        (MINIMAL, ["train.steps=true"], "train.steps: expected an integer"),
        (MINIMAL, ["data.patch_size=[16, 64]"], "data.patch_size: expected 3 values"),
        (MINIMAL, ["data.patch_size=[16, 64, 'x']"], "data.patch_size[2]: expected an integer"),
        (MINIMAL, ["data.augment=1"], "data.augment: expected true or false"),
        (MINIMAL, ["train.precision=fp8"], "train.precision: expected one of"),
        (MINIMAL, ["train.keep_checkpoints=1"], "train.keep_checkpoints: expected >= 2"),
        (MINIMAL, ["model.architecture=[2, 2]"], "model.resampling_stride: expected one [z, y, x] stride"),
        (MINIMAL, ["augmentation.affine_probability=2.0"], "augmentation affine_probability"),
        (MINIMAL, ["wandb.mode=sometimes"], "wandb.mode"),
        (MINIMAL, ["data.class_weights=[1.0, -1.0]"], "data.class_weights: expected weights >= 0"),
        ("", [], "data.dataset: required"),
        ("[data]\ndataset = 3\n", [], "data.dataset: expected a string"),
        ("data = 3\n", [], "'data' must be a section"),
        ("[data\n", [], "not valid TOML"),
    ],
)
def test_bad_configs_fail_naming_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=None) as raised:
        load_training_config(write(tmp_path, text), overrides)
    assert message in str(raised.value)


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: no such config file"):
        load_training_config(tmp_path / "nope.toml")


def test_override_values_are_read_as_toml_else_as_strings():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b = 0.5") == ("a.b", 0.5)
    assert parse_override("a.b=runs/x") == ("a.b", "runs/x")
    assert parse_override('a.b="quoted"') == ("a.b", "quoted")


def test_class_weights_become_the_samplers_class_probabilities_and_must_match_the_classes(tmp_path):
    config = load_training_config(write(tmp_path, MINIMAL), ["data.class_weights=[1, 1, 3]"])
    assert config.data.class_probabilities(4) == {1: 1.0, 2: 1.0, 3: 3.0}
    with pytest.raises(ValueError, match=r"data.class_weights: expected one weight per foreground class \(1\), got 3"):
        config.data.class_probabilities(2)
