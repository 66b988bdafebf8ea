"""Training at a target spacing: "auto" on a dataset of mixed slice thicknesses, exact resume with resampled
patches, whole-volume validation on the scans' own grids, and the spacing recorded for prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iunet3d.data import open_dataset
from iunet3d.data.synth import SYNTH_CLASS_NAMES, make_phantom
from iunet3d.distributed import Distributed
from iunet3d.infer.case_metrics import volume_confusion_counts
from iunet3d.infer.dice import dice_scores
from iunet3d.infer.trained_model import load_trained_model, predict_volume
from iunet3d.train.config import load_training_config
from iunet3d.train.trainer import Trainer
from tests.helpers.data import store_case
from tests.helpers.train import DEMO_CONFIG, tiny_config, tiny_dataset

SLICES = (1.25, 2.5, 5.0, 2.5)  # z spacing of each case; in-plane 0.8 mm; field of view 40 x 38 x 38 mm
#: "auto": the median (2.5, 0.8, 0.8) has z more than 3x the finest axis, so z takes its 10th percentile
AUTO = (1.625, 0.8, 0.8)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixed") / "data"
    for index, thickness in enumerate(SLICES):
        spacing = (thickness, 0.8, 0.8)
        image, label = make_phantom((round(40 / thickness), 48, 48), spacing, seed=(3, index))
        store_case(path, f"case_{index}", image, label, spacing, class_names=SYNTH_CLASS_NAMES)
    return path


def train(config, stop_after_first_step: bool = False) -> tuple[Trainer, dict]:
    trainer = Trainer(config, Distributed())
    trainer.preemption.requested = stop_after_first_step
    return trainer, trainer.fit()


@pytest.mark.slow
def test_auto_trains_at_the_target_spacing_and_records_it_for_prediction(mixed, tmp_path):
    config = tiny_config(mixed, tmp_path / "run", "train.steps=2", "train.checkpoint_every=2",
                         "data.validation_cases=1", "data.augment=true")  # fmt: skip
    assert config.data.target_spacing == "auto"
    trainer, summary = train(config)
    assert trainer.target_spacing == AUTO
    assert 0 <= summary["val/dice/liver"] <= 1
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-2.pt", weights_only=True)
    assert state["target_spacing"] == list(AUTO) and state["image_interpolation"] == "linear"
    assert state["training_spacing"] == [2.5, 0.8, 0.8]
    model = load_trained_model(tmp_path / "run" / "checkpoints" / "step-2.pt")
    assert model.target_spacing == AUTO
    # validation predicted the held-out case at the target spacing, scored on its own grid: as predict does
    (name,) = trainer.validator.cases
    case = open_dataset(mixed).case(name)
    labels = predict_volume(model, case.image_array, spacing=case.spacing)
    assert labels.shape == case.shape
    expected = dice_scores(volume_confusion_counts(labels, case.label_array()[...], 4), model.class_names)
    assert trainer.last_validation.dice == pytest.approx(expected, nan_ok=True)


@pytest.mark.slow
def test_resampled_patches_resume_bit_identically(mixed, tmp_path):
    extra = ("train.steps=3", "train.checkpoint_every=2", "data.augment=true", "validation.every=0",
             "data.validation_cases=1", "augmentation.affine_probability=0.5",
             "data.label_interpolation=linear")  # fmt: skip
    straight, _ = train(tiny_config(mixed, tmp_path / "a", *extra))
    assert straight.target_spacing == AUTO
    train(tiny_config(mixed, tmp_path / "b", *extra), stop_after_first_step=True)
    resumed, summary = train(tiny_config(mixed, tmp_path / "b", *extra))
    assert resumed.step == 3 and summary["completed"]
    expected, actual = straight.network.state_dict(), resumed.network.state_dict()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


@pytest.mark.slow
def test_a_uniform_dataset_trains_natively_and_an_explicit_spacing_is_used_as_given(tmp_path):
    uniform = tiny_dataset(tmp_path / "data", cases=2, shape=(12, 40, 40))
    native, _ = train(tiny_config(uniform, tmp_path / "a", "train.steps=1", "validation.every=0",
                                  "data.validation_cases=0"))  # fmt: skip
    assert native.target_spacing is None
    assert torch.load(tmp_path / "a" / "checkpoints" / "step-1.pt", weights_only=True)["target_spacing"] is None
    explicit = Trainer(tiny_config(uniform, tmp_path / "b", "data.target_spacing=[2.0, 1.0, 1.0]",
                                   "data.validation_cases=0"), Distributed())  # fmt: skip
    assert explicit.target_spacing == (2.0, 1.0, 1.0)
    sample = explicit.loader.stream.sample(0)
    assert sample["image"].shape == (1, 8, 32, 32) and np.isfinite(sample["image"].numpy()).all()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('data.target_spacing="coarse"', "data.target_spacing: expected 'auto', 'native' or"),
        ("data.target_spacing=[1.0, -1.0, 1.0]", "data.target_spacing: expected 'auto', 'native' or three positive"),
        ('data.image_interpolation="nearest"', "data.image_interpolation: expected one of linear, cubic"),
        ('data.label_interpolation="cubic"', "data.label_interpolation: expected one of nearest, linear"),
    ],
)
def test_bad_target_spacing_settings_are_named(override, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        load_training_config(DEMO_CONFIG, [f"data.dataset={tmp_path}", override])
