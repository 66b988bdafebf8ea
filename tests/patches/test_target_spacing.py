"""Patches at a target spacing: sizes in millimetres whatever the source spacing, one interpolation with the
affine augmentation, labels aligned with images, foreground centring through the spacing ratio."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from iunet3d.data import CTNormalization, DataError, open_dataset
from iunet3d.patches import AugmentationConfig, PatchStream, ValidationPatches
from iunet3d.patches.patch_stream import PatchCropper
from tests.helpers.data import store_case

TARGET = (1.5, 1.5, 1.5)
SLICES = (1.0, 2.5, 5.0)  # z spacing of the three cases; in-plane 1.0 mm
FIELD_MM = (90.0, 72.0, 72.0)
RADIUS_MM = 15.0
PATCH = (32, 32, 32)  # 48 mm at the target spacing
WINDOW = CTNormalization.window(-1000, 1000)
SPHERE_HU = 600
STRONG_AFFINE = AugmentationConfig(
    flip_axes=(), affine_probability=1.0, rotation_degrees=(30.0, 20.0, 20.0), scale_range=(0.8, 1.25),
    noise_probability=0.0, gamma_probability=0.0, contrast_probability=0.0, low_resolution_probability=0.0,
)  # fmt: skip


def sphere_case(z_spacing: float, centre_mm=(45.3, 36.2, 35.9)) -> tuple[np.ndarray, np.ndarray, tuple]:
    """A ball of ``RADIUS_MM`` (label 1, +600 HU, partial-volume averaged image) in water, at ``z_spacing``."""
    spacing = (z_spacing, 1.0, 1.0)
    shape = tuple(round(f / s) for f, s in zip(FIELD_MM, spacing, strict=True))
    # voxel centres in mm; the image averages 3 sub-samples per axis over each voxel (a slice's thickness)
    axes = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing, strict=True)]
    label = _ball([a[:, None] for a in axes], centre_mm)
    sub = [(a[:, None] + np.array([-1 / 3, 0, 1 / 3]) * s).ravel() for a, s in zip(axes, spacing, strict=True)]
    fine = _ball([a[:, None] for a in sub], centre_mm).astype(np.float32)
    image = fine.reshape(shape[0], 3, shape[1], 3, shape[2], 3).mean(axis=(1, 3, 5)) * SPHERE_HU
    return image.astype(np.int16), label.astype(np.uint8), spacing


def _ball(axes, centre) -> np.ndarray:
    z, y, x = axes[0].reshape(-1, 1, 1), axes[1].reshape(1, -1, 1), axes[2].reshape(1, 1, -1)
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= RADIUS_MM**2


@pytest.fixture(scope="module")
def spheres(tmp_path_factory):
    path = tmp_path_factory.mktemp("spheres") / "ds"
    for z_spacing in SLICES:
        image, label, spacing = sphere_case(z_spacing)
        store_case(path, f"slices_{z_spacing:g}mm", image, label, spacing, class_names=("background", "ball"))
    return path


def centred_start(case, centre_mm=(45.3, 36.2, 35.9)) -> tuple[float, ...]:
    """The first voxel's source coordinate of a ``PATCH`` at ``TARGET`` centred on ``centre_mm``."""
    ratio = np.asarray(TARGET) / np.asarray(case.spacing)
    centre = np.asarray(centre_mm) / np.asarray(case.spacing) - 0.5  # voxel i's centre is at (i + 0.5) * spacing
    return tuple(centre - (np.asarray(PATCH) - 1) / 2 * ratio)


def equivalent_radius(mask: np.ndarray) -> float:
    return (3 * mask.sum() / (4 * math.pi)) ** (1 / 3)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("label_interpolation", ["nearest", "linear"])
def test_a_sphere_has_its_radius_in_target_voxels_whatever_the_source_spacing(spheres, label_interpolation):
    dataset = open_dataset(spheres)
    crop = PatchCropper(PATCH, WINDOW, None, target_spacing=TARGET, label_interpolation=label_interpolation)
    expected = RADIUS_MM / TARGET[0]  # 10 voxels
    labels = {}
    for case in dataset:
        image, label = crop(case, centred_start(case), seed=None)
        assert image.shape == (1, *PATCH) and label.shape == PATCH
        ball = label.numpy() == 1
        assert abs(equivalent_radius(ball) - expected) <= 1.0, case.name
        for axis in (1, 2):  # in-plane diameter through the centre, in target voxels
            line = ball.take(PATCH[0] // 2, axis=0).take(PATCH[1] // 2, axis=axis - 1)
            assert abs(line.sum() / 2 - expected) <= 1.0, (case.name, axis)
        # the partial-volume image, thresholded half-way, shows the same ball
        bright = image[0].numpy() > WINDOW(np.array([SPHERE_HU / 2]))[0]
        assert abs(equivalent_radius(bright) - expected) <= 1.0, case.name
        labels[case.name] = ball
    thin, *others = labels.values()
    for other in others:  # the same ball, whatever the slices it was stored at
        assert dice(thin, other) >= 0.9


@pytest.mark.parametrize("label_interpolation", ["nearest", "linear"])
def test_labels_stay_aligned_with_images_under_the_affine_folded_into_the_resampling(spheres, label_interpolation):
    dataset = open_dataset(spheres)
    crop = PatchCropper(PATCH, WINDOW, STRONG_AFFINE, target_spacing=TARGET, label_interpolation=label_interpolation)
    threshold = WINDOW(np.array([SPHERE_HU / 2]))[0]
    for case in dataset:
        sizes = []
        for seed in range(3):
            image, label = crop(case, centred_start(case), seed=seed)
            ball, bright = label.numpy() == 1, image[0].numpy() > threshold
            assert dice(ball, bright) >= 0.9, (case.name, seed)
            sizes.append(ball.sum())
        assert len(set(sizes)) == 3  # three different zooms were drawn
        again, _ = crop(case, centred_start(case), seed=2)
        assert torch.equal(again, image)  # the augmentation is a function of the seed


def test_the_same_spacing_without_augmentation_reads_the_voxels_as_they_are(spheres):
    """A case already at the target spacing, at a whole-voxel start: the stored voxels, not interpolated."""
    dataset = open_dataset(spheres)
    case = dataset.case("slices_1mm")
    crop = PatchCropper((8, 16, 16), WINDOW, None, target_spacing=case.spacing)
    image, label = crop(case, (30.0, 20.0, 24.0), seed=None)
    stored = case.read_image((30, 20, 24), (8, 16, 16))
    np.testing.assert_array_equal(image[0].numpy(), WINDOW(stored))
    np.testing.assert_array_equal(label.numpy(), case.read_label((30, 20, 24), (8, 16, 16)))


def test_foreground_patches_are_centred_on_their_voxel_at_every_spacing(spheres):
    patch = (16, 16, 16)  # 24 mm: never clipped at the border around this ball
    options = {"patch_size": patch, "transform": None, "normalization": WINDOW, "target_spacing": TARGET}
    stream = PatchStream(spheres, foreground_fraction=1.0, **options)
    assert stream.target_spacing == TARGET
    seen = set()
    for position in range(12):
        sample = stream.sample(position)
        assert sample["label"][tuple(n // 2 for n in patch)] == 1  # the chosen ball voxel is at voxel P // 2
        assert sample["image"].shape == (1, *patch)
        seen.add(sample["case"])
    assert len(seen) == 3
    again = PatchStream(spheres, foreground_fraction=1.0, **options)
    assert torch.equal(again.sample(7)["image"], stream.sample(7)["image"])  # a pure function of seed and index
    uniform = PatchStream(spheres, foreground_fraction=0.0, **options)
    starts = np.array([uniform.sampler.draw(index).start for index in range(40)])
    assert starts.min() >= 0 and len(np.unique(starts[:, 0])) > 20  # inside the volume, continuous along z


def test_auto_resamples_a_mixed_dataset_and_validation_patches_follow(spheres):
    stream = PatchStream(spheres, patch_size=PATCH, transform=None, normalization=WINDOW, target_spacing="auto")
    assert stream.target_spacing == (2.5, 1.0, 1.0)  # the median slice thickness; in-plane 1.0
    patches = ValidationPatches(spheres, cases=["slices_5mm"], patch_size=(8, 16, 16), normalization=WINDOW,
                                target_spacing=(2.5, 1.0, 1.0))  # fmt: skip
    item = patches[0]
    assert item["image"].shape == (1, 8, 16, 16) and item["label"].shape == (8, 16, 16)


def test_native_is_unchanged_and_bad_target_spacings_are_named(spheres):
    native = PatchStream(spheres, patch_size=(4, 8, 8), transform=None, normalization=WINDOW)
    assert native.target_spacing is None and all(isinstance(s, int) for s in native.sampler.draw(0).start)
    for value, message in (("coarse", "target_spacing: expected 'auto', 'native'"), ([1.0, 0.0, 1.0], "three positive"),
                           ([1.0, 1.0], "three positive")):  # fmt: skip
        with pytest.raises(DataError, match=message):
            PatchStream(spheres, patch_size=(4, 8, 8), target_spacing=value)
    with pytest.raises(DataError, match="label_interpolation: expected one of nearest, linear"):
        PatchStream(spheres, patch_size=(4, 8, 8), target_spacing=TARGET, label_interpolation="cubic")
