"""The memory model: features of hand-computed configs, the least-squares fit, and (slow) a held-out check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from iunet3d.plan.memory_model import (
    FEATURES,
    MemoryModel,
    calibration_configs,
    features,
    format_validation,
    holdout,
)
from iunet3d.train.config import load_training_config
from iunet3d.train.demo import DEMO_CONFIG

SMALL = [
    "data.dataset=unused",
    "data.num_workers=0",
    "model.channels=8",
    "model.architecture=[1, 1, 1]",
    "model.resampling_stride=[[1, 2, 2], [2, 2, 2]]",
    "model.block_depth=1",
]


def config(*extra: str):
    return load_training_config(DEMO_CONFIG, [*SMALL, *extra])


def test_features_of_a_hand_computed_config():
    from iunet3d.models.segmentation import SegmentationIUNet

    c = config("data.patch_size=[8, 32, 48]", "data.batch_size=3", "data.num_workers=2")
    network = SegmentationIUNet(1, 4, **c.model.network_kwargs())
    parameters = sum(p.numel() for p in network.parameters())
    volume = 3 * 8 * 32 * 48
    assert list(features(c)) == [1.0, 2.0, float(parameters), float(volume * 8), float(volume * 4)]
    assert features(c, num_classes=2)[4] == volume * 2  # data.classes (4 in the demo) or the caller's count


def test_fit_reproduces_synthetic_data_from_known_coefficients():
    truth = {"constant": 3.1e8, "workers": 2.5e8, "parameters": 16.0, "activations": 23.5, "classes": 61.0}
    configs = [
        config(f"data.patch_size={list(p)}", f"data.batch_size={b}", f"model.channels={c}",
               f"model.architecture={a}", f"data.num_workers={w}")
        for p, b, c, a, w in [((8, 32, 32), 1, 8, [1, 1, 1], 0), ((16, 32, 32), 2, 8, [1, 1, 1], 1),
                              ((8, 64, 64), 1, 16, [2, 2, 2], 2), ((16, 64, 32), 3, 12, [1, 2, 1], 1),
                              ((8, 32, 64), 2, 4, [1, 1, 1], 0), ((16, 64, 64), 1, 8, [1, 1, 1], 2)]
    ]  # fmt: skip
    truth_vector = np.array([truth[name] for name in FEATURES])
    peaks = [float(features(c) @ truth_vector) for c in configs]
    model = MemoryModel.fit(configs, peaks)
    for name in FEATURES:
        assert model.coefficients[name] == pytest.approx(truth[name], rel=1e-6), name
    assert model.predict(configs[2]) == pytest.approx(peaks[2], rel=1e-9)
    assert model.info["max_abs_error_percent"] < 1e-6
    again = MemoryModel.from_dict(model.to_dict())
    assert again.predict(configs[3]) == pytest.approx(model.predict(configs[3]))
    assert "B/parameter" in model.describe()


def test_fit_leaves_a_feature_that_does_not_vary_at_zero_and_needs_enough_measurements():
    configs = [config(f"data.patch_size=[8, {y}, 32]", f"data.batch_size={b}", f"model.channels={c}")
               for y, b, c in [(32, 1, 8), (64, 1, 8), (32, 2, 16)]]  # fmt: skip
    truth = np.array([4e8, 0.0, 16.0, 30.0, 50.0])
    model = MemoryModel.fit(configs, [float(features(c) @ truth) for c in configs])
    assert model.coefficients["workers"] == 0.0  # every config has 0 workers: absorbed by the constant
    assert model.coefficients["activations"] == pytest.approx(30.0, rel=1e-6)
    with pytest.raises(ValueError, match="2 measurements for 3 coefficients"):
        MemoryModel.fit(configs[:2], [1.0, 2.0])
    with pytest.raises(ValueError, match="unknown features"):
        MemoryModel.from_dict({"coefficients": {"depth": 1.0}})


def test_calibration_configs_vary_each_feature_with_patches_the_model_accepts():
    base = config("data.num_workers=1", "model.channels=16")
    configs = calibration_configs(base)
    matrix = np.stack([features(c) for c in configs])
    assert np.linalg.matrix_rank(matrix[:, [0, 1, 3, 4]]) == 4  # constant, workers, activations, classes
    for c in configs:
        assert all(s % f == 0 for s, f in zip(c.data.patch_size, (2, 4, 4), strict=True))
        assert math.prod(c.data.patch_size) <= 16 * 64 * 64
    assert len({c.model.architecture for c in configs}) == 2  # couplings per level vary too


@pytest.mark.slow
def test_held_out_configs_are_predicted_within_ten_percent(tmp_path):
    from iunet3d.plan.probe import measure_training
    from tests.helpers.train import tiny_dataset

    dataset = tiny_dataset(tmp_path / "data", cases=3, shape=(16, 64, 64))
    base = load_training_config(DEMO_CONFIG, [*SMALL, f"data.dataset={dataset}", "data.validation_cases=1"])
    small, _, reference, batch, channels, _ = calibration_configs(base, min_patch=(4, 16, 16))
    fit_configs = [small, reference, batch, channels]  # enough for the three features that vary (workers: 0)
    held_out = [
        calibration_configs(base, channels=12, min_patch=(8, 24, 24))[3],  # other patch, batch 2, 12 channels
        calibration_configs(base, channels=6, min_patch=(8, 32, 32))[5],  # deeper, 6 channels, larger patch
    ]
    measured = [(c, measure_training(c, steps=2)) for c in fit_configs + held_out]
    model, rows = holdout(measured[: len(fit_configs)], measured[len(fit_configs) :])
    print(model.describe(), format_validation(rows), sep="\n")
    for row in rows:
        assert abs(row.error_percent) < 10, format_validation(rows)
