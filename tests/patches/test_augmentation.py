"""Augmentation of patches: context margin geometry, axis conventions, labels staying on their voxels."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from iunet3d.data import CTNormalization, DataError, open_dataset
from iunet3d.patches import AugmentationConfig, PatchStream
from iunet3d.patches.augmentation import augmentation_margin
from iunet3d.patches.transforms import augment_region, build_transform, region_affine, region_steps
from tests.helpers.data import store_case

SPACING = (2.5, 0.8, 0.8)
WINDOW = CTNormalization.window(-1000, 1000)
SPATIAL_ONLY = {"noise_probability": 0.0, "gamma_probability": 0.0, "contrast_probability": 0.0}


def rotation(axis: int, degrees: float) -> np.ndarray:
    i, j = (a for a in range(3) if a != axis)
    matrix = np.eye(3)
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


@pytest.mark.parametrize(
    ("patch", "degrees"),
    [((32, 96, 96), (20.0, 5.0, 0.0)), ((8, 128, 64), (20.0, 5.0, 0.0)), ((64, 64, 64), (20.0, 5.0, 0.0)),
     ((8, 128, 128), (20.0, 5.0, 30.0))],  # a thin slab tilted far about x: the worst angle is not the largest
)  # fmt: skip
def test_the_margin_contains_every_source_point_of_the_worst_case_rotation_and_zoom(patch, degrees):
    config = AugmentationConfig(rotation_degrees=degrees, scale_range=(0.8, 1.2), low_resolution_probability=0)
    margin = np.array(augmentation_margin(patch, SPACING, config))
    half = (np.array(patch) / 2) * SPACING  # mm from the patch centre to its faces
    reach = (np.array(patch) / 2 + margin - 1) * SPACING  # what the region covers, less one voxel to interpolate
    corners = np.array(list(itertools.product(*[(-h, h) for h in half])))
    worst = 0.0
    angles = [np.linspace(-d, d, 9) for d in degrees]
    for angle_z, angle_y, angle_x in itertools.product(*angles):
        turn = rotation(0, angle_z) @ rotation(1, angle_y) @ rotation(2, angle_x)
        for scales in itertools.product((0.8, 1.2), repeat=3):
            for zoom in (np.diag(scales), np.diag(1 / np.array(scales))):  # either convention of "scale"
                source = corners @ (turn @ zoom).T
                worst = max(worst, float((np.abs(source) / reach).max()))
    assert worst <= 1.0
    assert worst > 0.7  # and the margin is not wastefully large


def test_no_context_is_read_without_transforms_that_need_it():
    assert augmentation_margin((32, 64, 64), SPACING, None) == (0, 0, 0)
    flips_and_intensity = AugmentationConfig(affine_probability=0, low_resolution_probability=0)
    assert augmentation_margin((32, 64, 64), SPACING, flips_and_intensity) == (0, 0, 0)
    low_resolution_only = AugmentationConfig(affine_probability=0, low_resolution_factor=(1.0, 3.0))
    assert augmentation_margin((32, 64, 64), SPACING, low_resolution_only) == (4, 1, 1)


def _augment(image: np.ndarray, config: AugmentationConfig, seed: int) -> np.ndarray:
    torch.manual_seed(seed)
    region = torch.from_numpy(image)[None]
    steps = build_transform(config)
    import torchio as tio

    subject = tio.Subject(image=tio.ScalarImage(tensor=region, affine=region_affine(SPACING, (0, 0, 0))))
    return steps(subject)["image"].data[0].numpy()


def test_axis_0_is_the_z_axis_for_rotations_and_simulated_low_resolution():
    z_profile = np.broadcast_to(np.linspace(-1, 1, 24)[:, None, None], (24, 48, 48)).astype(np.float32).copy()
    in_plane = np.broadcast_to(np.random.default_rng(0).normal(size=(1, 48, 48)), (24, 48, 48)).astype(np.float32)
    in_plane = in_plane.copy()
    rotate = {"affine_probability": 1.0, "scale_range": (1.0, 1.0), "low_resolution_probability": 0.0}
    about_z = AugmentationConfig(flip_axes=(), rotation_degrees=(40.0, 0.0, 0.0), **rotate, **SPATIAL_ONLY)
    about_x = AugmentationConfig(flip_axes=(), rotation_degrees=(0.0, 0.0, 40.0), **rotate, **SPATIAL_ONLY)
    inner = (slice(4, 20), slice(14, 34), slice(14, 34))  # away from padding at the corners
    np.testing.assert_allclose(_augment(z_profile, about_z, 1)[inner], z_profile[inner], atol=1e-5)
    assert np.abs(_augment(z_profile, about_x, 1)[inner] - z_profile[inner]).max() > 0.1
    low_z = AugmentationConfig(flip_axes=(), affine_probability=0, low_resolution_probability=1.0,
                               low_resolution_factor=(3.0, 3.0), **SPATIAL_ONLY)  # fmt: skip
    low_y = AugmentationConfig(**(low_z.to_dict() | {"low_resolution_axis": 1}))
    np.testing.assert_allclose(_augment(in_plane, low_z, 2), in_plane, atol=1e-5)  # constant along z: unchanged
    assert np.abs(_augment(in_plane, low_y, 2) - in_plane).max() > 0.1


@pytest.fixture(scope="module")
def threshold_phantom(tmp_path_factory):
    """Smooth blobs of 300 HU in -200 HU whose label is exactly ``image > 50 HU``."""
    shape = (40, 96, 96)
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, SPACING, strict=True)], indexing="ij"))
    rng = np.random.default_rng(3)
    field = np.zeros(shape)
    for _ in range(12):
        centre = rng.uniform(0, 1, 3) * np.array(shape) * SPACING
        radius = rng.uniform(6, 14)
        field += np.exp(-(((grid - centre[:, None, None, None]) ** 2).sum(axis=0)) / (2 * radius**2))
    image = np.where(field > 0.5, 300, -200).astype(np.int16)
    image = (image + np.round(100 * (field - 0.5)).clip(-100, 100)).astype(np.int16)  # graded, still thresholdable
    label = (image > 50).astype(np.uint8)
    path = tmp_path_factory.mktemp("threshold") / "ds"
    store_case(path, "blobs", image, label, SPACING, class_names=("background", "blob"))
    return path


@pytest.mark.slow
def test_labels_stay_aligned_with_the_image_under_spatial_augmentation(threshold_phantom):
    strong = AugmentationConfig(affine_probability=1.0, rotation_degrees=(30.0, 10.0, 10.0), scale_range=(0.7, 1.4),
                                elastic_probability=1.0, low_resolution_probability=0.0, **SPATIAL_ONLY)  # fmt: skip
    options = {"patch_size": (24, 64, 64), "normalization": WINDOW, "foreground_fraction": 0.5, "seed": 11}
    plain = PatchStream(threshold_phantom, transform=None, **options)
    augmented = PatchStream(threshold_phantom, transform=strong, **options)
    threshold = WINDOW(np.array([50]))[0]
    for position in range(6):
        before, after = plain.sample(position), augmented.sample(position)
        assert torch.equal(before["location"], after["location"])
        assert torch.equal(before["label"], (before["image"][0] > threshold).long())  # exact without augmentation
        moved = (after["label"] != before["label"]).float().mean()
        assert moved > 0.02  # the augmentation really moved voxels
        agreement = (after["label"] == (after["image"][0] > threshold).long()).float().mean()
        assert agreement > 0.98  # interpolation differs from nearest-neighbour only at blob surfaces
        flipped = (after["label"].flip(-1) == (after["image"][0] > threshold).long()).float().mean()
        assert flipped < agreement - 0.02  # a misaligned label would be caught


def test_flips_move_image_and_label_together(threshold_phantom):
    flips = AugmentationConfig(affine_probability=0.0, low_resolution_probability=0.0, **SPATIAL_ONLY)
    case = open_dataset(threshold_phantom).case("blobs")
    hu = case.read_image((4, 10, 10), (24, 64, 64))
    label = case.read_label((4, 10, 10), (24, 64, 64))
    threshold = WINDOW(np.array([50]))[0]
    flipped_any = False
    for seed in range(6):
        torch.manual_seed(seed)
        image_t, label_t = augment_region(
            WINDOW(hu), label, region_affine(SPACING, (0, 0, 0)), (0, 0, 0), None, build_transform(flips)
        )
        assert torch.equal(label_t.long(), (image_t[0] > threshold).long())
        flipped_any |= not torch.equal(label_t, torch.from_numpy(label))
    assert flipped_any


def test_intensity_augmentation_leaves_labels_untouched(threshold_phantom):
    intensity = AugmentationConfig(flip_axes=(), affine_probability=0.0, low_resolution_probability=0.0,
                                   noise_probability=1.0, gamma_probability=1.0, contrast_probability=1.0)  # fmt: skip
    options = {"patch_size": (24, 64, 64), "normalization": WINDOW, "seed": 2}
    plain = PatchStream(threshold_phantom, transform=None, **options).sample(0)
    changed = PatchStream(threshold_phantom, transform=intensity, **options).sample(0)
    assert torch.equal(plain["label"], changed["label"])
    assert not torch.allclose(plain["image"], changed["image"], atol=1e-3)


def test_the_transform_pipeline_keeps_context_transforms_apart():
    names = [type(t).__name__ for t in region_steps(AugmentationConfig(elastic_probability=0.5))]
    assert names == ["RandomAffine", "RandomElasticDeformation", "RandomAnisotropy"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"affine_probability": 1.5}, "affine_probability: expected a number in"),
        ({"flip_axes": (0, 3)}, "flip_axes"),
        ({"scale_range": (1.2, 0.8)}, "scale_range"),
        ({"rotation_degrees": (10.0, 0.0)}, "rotation_degrees"),
        ({"low_resolution_factor": (0.5, 2.0)}, "low_resolution_factor"),
        ({"low_resolution_axis": 5}, "low_resolution_axis"),
    ],
)
def test_bad_augmentation_settings_are_named(changes, message):
    with pytest.raises(DataError, match=message):
        AugmentationConfig(**changes)
