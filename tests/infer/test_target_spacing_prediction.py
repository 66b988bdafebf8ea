"""Whole-volume prediction at a model's target spacing, returned onto the scan's own voxels."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from iunet3d.cli import main
from iunet3d.data import open_dataset
from iunet3d.data.normalization import CTNormalization
from iunet3d.data.resampling import resampled_shape
from iunet3d.infer.memory_plan import plan_memory
from iunet3d.infer.prediction_job import spacing_warning
from iunet3d.infer.prediction_store import PREDICTION
from iunet3d.infer.trained_model import TrainedModel, load_trained_model, predict_volume
from iunet3d.models.segmentation import SegmentationIUNet
from tests.helpers.data import store_case

#: class k of the synthetic scans has this intensity; background in the middle, so that the partial volume
#: of a structure's edge (between its level and the background's) never looks like the other structure
HU_LEVELS = (0.0, -600.0, 600.0)
NORMALIZATION = CTNormalization.window(-1000.0, 1000.0)
TARGET = (1.5, 1.0, 1.0)
CLASS_NAMES = ["background", "liver", "bone"]


class IntensityClassifier(nn.Module):
    """An identity-like network: logits -(x - l_k)^2 of the normalised intensity x, l_k = class k's level."""

    def __init__(self):
        super().__init__()
        levels = NORMALIZATION(np.asarray(HU_LEVELS, np.float32))
        self.register_buffer("levels", torch.as_tensor(levels).view(1, -1, 1, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, K, D, H, W)."""
        return -((image - self.levels) ** 2) * 20


def model(target_spacing=TARGET, training_spacing=None, patch_size=(24, 48, 48)) -> TrainedModel:
    return TrainedModel(IntensityClassifier(), CLASS_NAMES, 1, patch_size, NORMALIZATION, step=0,
                        source=Path("(test)"), target_spacing=target_spacing,
                        training_spacing=training_spacing)  # fmt: skip


def phantom(spacing, field_mm=(48.0, 52.0, 52.0)) -> tuple[np.ndarray, np.ndarray]:
    """int16 HU (D, H, W) and uint8 labels of an ellipsoid (class 1) and a sphere (class 2), 10-16 mm radii."""
    shape = tuple(round(f / s) for f, s in zip(field_mm, spacing, strict=True))
    z, y, x = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    label = np.zeros(shape, np.uint8)
    label[((z - 24) / 16) ** 2 + ((y - 16) / 12) ** 2 + ((x - 22) / 13) ** 2 <= 1] = 1
    label[((z - 24) / 10) ** 2 + ((y - 38) / 10) ** 2 + ((x - 34) / 10) ** 2 <= 1] = 2
    image = np.asarray(HU_LEVELS, np.float32)[label].astype(np.int16)
    return image, label


def dice(prediction: np.ndarray, reference: np.ndarray, k: int) -> float:
    a, b = prediction == k, reference == k
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("slice_spacing", [1.0, 2.5, 5.0])
def test_an_identity_like_network_predicts_the_labels_back_on_the_scan_grid(tmp_path, slice_spacing):
    spacing = (slice_spacing, 0.8, 0.8)
    image, label = phantom(spacing)
    network = model()
    assert network.target_grid(image.shape, spacing) == resampled_shape(image.shape, spacing, TARGET)
    chances = np.zeros((3, *image.shape), np.float32)
    in_memory = predict_volume(network, image, spacing=spacing, probabilities=chances)
    streamed_chances = np.zeros_like(chances)
    streamed = predict_volume(network, image, spacing=spacing, stream=True, scratch=tmp_path,
                              probabilities=streamed_chances)  # fmt: skip
    assert in_memory.shape == image.shape and in_memory.dtype == np.uint8
    for k in (1, 2):
        assert dice(in_memory, label, k) >= 0.95, (k, dice(in_memory, label, k))
    assert (streamed != in_memory).mean() < 1e-4
    assert np.allclose(streamed_chances, chances, atol=1e-5)
    assert np.allclose(chances.sum(axis=0), 1, atol=1e-5) and chances.min() >= 0
    assert np.array_equal(chances.argmax(axis=0), in_memory)
    assert list(tmp_path.glob("iunet3d-accumulator-*")) == []


def test_a_streamed_resampled_prediction_reads_its_image_and_writes_its_labels_chunk_by_chunk(tmp_path):
    spacing = (2.5, 0.8, 0.8)
    image, label = phantom(spacing)
    path = tmp_path / "image.zarr"
    zarr.create_array(str(path), shape=image.shape, chunks=(10, 65, 65), dtype="int16")[...] = image
    out = zarr.create_array(str(tmp_path / "labels.zarr"), shape=image.shape, chunks=(12, 40, 40), dtype="uint8")
    predict_volume(model(), zarr.open_array(str(path), mode="r"), spacing=spacing, stream=True, scratch=tmp_path,
                   out=out)  # fmt: skip
    assert np.array_equal(np.asarray(out[...]), predict_volume(model(), image, spacing=spacing))
    assert dice(np.asarray(out[...]), label, 2) >= 0.95


def test_plan_memory_counts_the_target_grid_and_refuses_below_what_streaming_needs():
    shape, patch = (40, 200, 200), (16, 64, 64)
    target_shape = resampled_shape(shape, (5.0, 0.8, 0.8), TARGET)  # (133, 160, 160): more voxels than the scan
    native = plan_memory(3, shape, patch, 2)
    plan = plan_memory(3, shape, patch, 2, target_shape=target_shape)
    assert not plan.streamed and plan.target_shape == target_shape and native.target_shape is None
    assert plan.in_memory_bytes > native.in_memory_bytes + 4 * 4 * (math.prod(target_shape) - math.prod(shape))
    assert "on the resampled grid 133x160x160" in plan.describe(None)
    assert "resampled" not in native.describe(None)
    streamed = plan_memory(3, shape, patch, 2, (8, 64, 64), max_memory=plan.in_memory_bytes // 4,
                           target_shape=target_shape)  # fmt: skip
    assert streamed.streamed and streamed.chunk == (8, 32, 32) and streamed.needed_bytes <= plan.in_memory_bytes // 4
    assert streamed.block == (8, 64, 64)  # the label array's chunks, on the scan grid
    minimum = plan_memory(3, shape, patch, 2, stream=True, target_shape=target_shape, max_memory=10**9)
    with pytest.raises(ValueError, match=r"max memory 1\.0 MB is below the [0-9.]+ MB that streaming needs .* "
                                         r"on the resampled grid 133x160x160"):  # fmt: skip
        plan_memory(3, shape, patch, 2, max_memory=2**20, target_shape=target_shape)
    assert minimum.needed_bytes > 2**20
    image, _ = phantom((2.5, 0.8, 0.8))
    with pytest.raises(ValueError, match=r"max memory 0\.0 MB is below the [0-9.]+ MB that streaming needs"):
        predict_volume(model(), image, spacing=(2.5, 0.8, 0.8), max_memory=1)


def test_the_native_path_is_unchanged_without_a_target_spacing_or_at_the_same_spacing():
    spacing = (1.5, 1.0, 1.0)
    image, label = phantom(spacing)
    native = model(target_spacing=None)
    reference = predict_volume(native, image)
    assert native.target_grid(image.shape, (5.0, 0.8, 0.8)) is None  # native: no resampling whatever the scan
    assert np.array_equal(predict_volume(native, image, spacing=(5.0, 0.8, 0.8)), reference)
    same = model(target_spacing=(1.5 * (1 + 1e-5), 1.0, 1.0))
    assert same.target_grid(image.shape, spacing) is None and not same.resamples(spacing)
    assert np.array_equal(predict_volume(same, image, spacing=spacing), reference)
    assert model().target_grid(image.shape, None) is None  # no spacing given: native
    assert dice(reference, label, 1) == 1.0


class InRange(nn.Module):
    """Class 1 where the whole window is within the normalised range [-1, 1], else class 2 (0: never)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, 3, D, H, W)."""
        inside = (image.abs().amax(dim=(1, 2, 3, 4), keepdim=True) <= 1).float() * 2 - 1
        return torch.cat([torch.zeros_like(image) - 2, inside.expand_as(image), -inside.expand_as(image)], dim=1)


def test_windows_beyond_a_resampled_volume_are_padded_with_normalised_air():
    image = np.full((3, 20, 20), -1000, np.int16)  # smaller than a window along every axis
    network = TrainedModel(InRange(), CLASS_NAMES, 1, (16, 32, 32), NORMALIZATION, step=0, source=Path("(test)"),
                           target_spacing=TARGET)  # fmt: skip
    labels = predict_volume(network, image, spacing=(5.0, 0.8, 0.8))  # resampled to 10x16x16 and padded
    assert labels.shape == image.shape and np.all(labels == 1)  # raw HU padding (-1024) would give class 2
    assert np.all(predict_volume(network, image) == 1)  # the native path normalises its HU padding


def test_spacing_warnings_for_a_coarse_scan_and_for_a_native_model_trained_elsewhere():
    assert "coarser than the model's target spacing 1.5x1.0x1.0 mm along z" in spacing_warning(model(), (5.0, 0.8, 0.8))
    assert spacing_warning(model(), (2.5, 0.8, 0.8)) is None
    native = model(target_spacing=None, training_spacing=(1.0, 0.8, 0.8))
    message = spacing_warning(native, (5.0, 0.8, 0.8))
    assert "differs from the training data's 1.0x0.8x0.8 mm by more than 1.2x along z" in message
    assert 'data.target_spacing = "auto"' in message
    assert spacing_warning(native, (1.1, 0.75, 0.85)) is None
    assert spacing_warning(model(target_spacing=None), (5.0, 0.8, 0.8)) is None  # nothing recorded to compare


def test_whole_volume_validation_runs_at_the_target_spacing_and_scores_on_the_scan_grid(tmp_path):
    from iunet3d.distributed import Distributed
    from iunet3d.train.config import ValidationConfig
    from iunet3d.train.volume_validation import VolumeValidator

    image, label = phantom((5.0, 0.8, 0.8))
    store_case(tmp_path / "data", "thick", image, label, (5.0, 0.8, 0.8), class_names=CLASS_NAMES)
    dataset = open_dataset(tmp_path / "data")
    validator = VolumeValidator(dataset, ["thick"], (24, 48, 48), ValidationConfig(), Distributed(), NORMALIZATION,
                                target_spacing=TARGET, image_interpolation="cubic")  # fmt: skip
    result = validator.run(IntensityClassifier(), panels=1)
    assert min(result.dice.values()) >= 0.95, result.dice
    (case,) = result.cases
    assert case.case == "thick" and case.spacing == pytest.approx((5.0, 0.8, 0.8))  # scored on the scan's grid
    z = int(case.panel.caption.split("z=")[1].split()[0])
    height, width = image.shape[1:]
    assert np.array_equal(case.panel.label[:height, :width], label[z])  # the axial tile: the scan's own plane


def _checkpoint(path: Path, **extra) -> Path:
    """A training checkpoint of a tiny (untrained) network; ``extra``: the target spacing keys."""
    kwargs = {"in_channels": 1, "num_classes": 3, "channels": 8, "architecture": [1, 1, 1],
              "resampling_stride": [[1, 2, 2], [2, 2, 2]], "block_depth": 1}  # fmt: skip
    torch.manual_seed(0)
    network = SegmentationIUNet(**kwargs)
    torch.save({"step": 1, "model": network.state_dict(), "network": kwargs, "class_names": CLASS_NAMES,
                "patch_size": [16, 32, 32], "normalization": NORMALIZATION.to_dict(), **extra}, path)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def coarse_dataset(tmp_path_factory) -> Path:
    image, label = phantom((5.0, 0.8, 0.8), field_mm=(20.0, 32.0, 32.0))
    dataset = tmp_path_factory.mktemp("coarse") / "data"
    store_case(dataset, "thick", image, label, (5.0, 0.8, 0.8), class_names=CLASS_NAMES)
    return dataset


def test_predict_resamples_a_case_to_the_checkpoints_target_spacing_and_writes_scan_grid_labels(
    coarse_dataset, tmp_path, capsys
):
    checkpoint = _checkpoint(tmp_path / "step-1.pt", target_spacing=[1.5, 1.0, 1.0], image_interpolation="cubic",
                             training_spacing=[1.5, 0.8, 0.8])  # fmt: skip
    loaded = load_trained_model(checkpoint)
    assert loaded.target_spacing == TARGET and loaded.image_interpolation == "cubic"
    assert loaded.training_spacing == (1.5, 0.8, 0.8)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"case thick: spacing 5\.0x0\.8x0\.8 mm is more than 2x coarser"):
        assert main(["predict", "--no-progress", "--checkpoint", str(checkpoint), "--input", str(coarse_dataset),
                     "--out", str(out), "--probabilities"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "thick (4, 40, 40): resampled 5.0x0.8x0.8 -> 1.5x1.0x1.0 mm, grid 4x40x40 -> 13x32x32" in printed
    assert "MB to predict in memory on the resampled grid 13x32x32" in printed
    case = open_dataset(out).case("thick")
    prediction = np.asarray(case.label_array(PREDICTION)[...])
    assert prediction.shape == (4, 40, 40) and prediction.max() < 3
    chances = np.asarray(zarr.open_group(case.path, mode="r")["probabilities/0"][...], dtype=np.float32)
    assert chances.shape == (3, 4, 40, 40) and np.allclose(chances.sum(axis=0), 1, atol=4e-3)
    assert (out / "metrics.csv").is_file()


def test_an_old_checkpoint_without_the_spacing_keys_predicts_natively(coarse_dataset, tmp_path, capsys):
    old = load_trained_model(_checkpoint(tmp_path / "old.pt"))
    assert (old.target_spacing, old.image_interpolation, old.training_spacing) == (None, "linear", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no spacing recorded: nothing to warn about
        assert main(["predict", "--no-progress", "--checkpoint", str(tmp_path / "old.pt"), "--input",
                     str(coarse_dataset), "--out", str(tmp_path / "old")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "thick (4, 40, 40): " in printed and "resampled" not in printed
    prediction = open_dataset(tmp_path / "old").case("thick").label_array(PREDICTION)
    assert prediction.shape == (4, 40, 40)


def test_a_native_model_warns_when_the_scan_is_far_from_its_training_spacing(coarse_dataset, tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path / "native.pt", target_spacing=None, training_spacing=[1.0, 0.8, 0.8])
    with pytest.warns(UserWarning, match=r"differs from the training data's 1\.0x0\.8x0\.8 mm by more than 1\.2x"):
        assert main(["predict", "--no-progress", "--checkpoint", str(checkpoint), "--input", str(coarse_dataset),
                     "--out", str(tmp_path / "native")]) == 0  # fmt: skip
    assert "resampled" not in capsys.readouterr().out


def test_a_checkpoint_with_a_bad_target_spacing_is_refused_naming_it(tmp_path):
    checkpoint = _checkpoint(tmp_path / "bad.pt", target_spacing=[1.5, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"bad\.pt: target_spacing: expected .* three positive spacings"):
        load_trained_model(checkpoint)
    checkpoint = _checkpoint(tmp_path / "bad2.pt", image_interpolation="nearest")
    with pytest.raises(ValueError, match=r"bad2\.pt: image_interpolation: expected one of linear, cubic"):
        load_trained_model(checkpoint)
