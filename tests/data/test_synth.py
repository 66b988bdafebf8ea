"""Synthetic CT phantoms: dtypes, determinism, classes, HU statistics, geometry in millimetres, validation."""

import ast
import math
from pathlib import Path

import numpy as np
import pytest

import iunet3d.data.synth as synth
from iunet3d.data.synth import DEFAULT_SHAPE, DEFAULT_SPACING, SYNTH_CLASS_NAMES, make_phantom

LIVER, KIDNEY, LESION = 1, 2, 3
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def phantoms() -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Default-shape phantoms by seed (each takes well under a second)."""
    return {seed: make_phantom(seed=seed) for seed in SEEDS}


def _face_neighbours(mask: np.ndarray) -> list[np.ndarray]:
    """The 6 face-neighbour shifts of ``mask``, padded with False at the volume border."""
    padded = np.pad(mask, 1)
    inner = (slice(1, -1),) * 3
    shifts = []
    for axis in range(3):
        for step in (1, -1):
            index = list(inner)
            index[axis] = slice(1 + step, mask.shape[axis] + 1 + step)
            shifts.append(padded[tuple(index)])
    return shifts


def test_public_constants():
    assert SYNTH_CLASS_NAMES == ("background", "liver", "kidney", "lesion")
    assert DEFAULT_SHAPE == (64, 160, 160)
    assert DEFAULT_SPACING == (2.5, 0.8, 0.8)


def test_dtypes_shapes_and_label_values(phantoms):
    image, label = phantoms[0]
    assert image.dtype == np.int16 and label.dtype == np.uint8
    assert image.shape == label.shape == DEFAULT_SHAPE
    assert set(np.unique(label)) <= {0, 1, 2, 3}
    image, label = make_phantom(shape=[9, 20, 30], spacing=[3, 1.5, 1], seed=[4, 7])  # lists, as from the CLI
    assert image.shape == label.shape == (9, 20, 30)
    assert image.dtype == np.int16 and label.dtype == np.uint8


def test_same_seed_same_phantom_and_different_seeds_differ(phantoms):
    image, label = make_phantom(seed=0)
    np.testing.assert_array_equal(image, phantoms[0][0])
    np.testing.assert_array_equal(label, phantoms[0][1])
    assert not np.array_equal(phantoms[0][1], phantoms[1][1])
    assert not np.array_equal(phantoms[0][0], phantoms[1][0])
    case_a, case_b = make_phantom((16, 32, 32), seed=(5, 0)), make_phantom((16, 32, 32), seed=(5, 1))
    np.testing.assert_array_equal(case_a[0], make_phantom((16, 32, 32), seed=(5, 0))[0])
    assert not np.array_equal(case_a[1], case_b[1])


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [
        (DEFAULT_SHAPE, DEFAULT_SPACING),
        ((24, 48, 48), (2.5, 0.8, 0.8)),
        ((16, 32, 32), (2.5, 0.8, 0.8)),
        ((16, 32, 32), (0.8, 0.8, 0.8)),
    ],
)
def test_every_class_present(shape, spacing):
    for seed in SEEDS:
        _, label = make_phantom(shape, spacing, seed)
        counts = np.bincount(label.ravel(), minlength=4)
        assert np.all(counts[1:] > 0), f"seed {seed}: class voxel counts {counts.tolist()}"
        assert counts[LIVER] > counts[KIDNEY] and counts[LIVER] > counts[LESION]


@pytest.mark.parametrize("seed", SEEDS)
def test_hu_statistics_per_region(phantoms, seed):
    image, label = phantoms[seed]
    liver_median = np.median(image[label == LIVER])
    assert 45 <= liver_median <= 75
    assert 120 <= np.median(image[label == KIDNEY]) <= 180
    assert np.median(image[label == LESION]) < liver_median - 25
    corners = image[:, [0, 1, -2, -1]][:, :, [0, 1, -2, -1]]
    assert abs(np.median(corners) + 1000) <= 20
    assert (image > 500).sum() > 100, "no bone"
    labelled = image[label > 0]
    assert np.mean((labelled > -200) & (labelled < 400)) > 0.99, "labels overlap air, lung or bone"
    assert not label[:, [0, -1]].any() and not label[:, :, [0, -1]].any(), "labels at the field-of-view edge"


@pytest.mark.parametrize("seed", SEEDS)
def test_lungs_are_dark_regions_enclosed_by_the_body(phantoms, seed):
    image, _ = phantoms[seed]
    body = image > -300
    columns = np.arange(image.shape[2])
    has_body = body.any(axis=2)
    first = np.where(has_body, body.argmax(axis=2), image.shape[2])[..., None]
    last = np.where(has_body, image.shape[2] - 1 - body[:, :, ::-1].argmax(axis=2), -1)[..., None]
    enclosed_dark = (image < -700) & (columns > first) & (columns < last)
    assert enclosed_dark.sum() > 5000


@pytest.mark.parametrize("seed", SEEDS)
def test_partial_volume_blur_and_noise(phantoms, seed):
    image, label = phantoms[seed]
    liver = label == LIVER
    core = liver.copy()
    for neighbour in _face_neighbours(liver):
        core &= neighbour
    assert 8 <= image[core].std() <= 25, "noise of ~10-20 HU expected inside the liver"
    edge_values = ((image > -700) & (image < -300)).sum()  # only blurred air/tissue boundaries give these
    assert edge_values > 1000


@pytest.mark.parametrize("seed", SEEDS)
def test_lesions_lie_inside_the_liver(phantoms, seed):
    _, label = phantoms[seed]
    lesion, liver_or_lesion = label == LESION, np.isin(label, (LIVER, LESION))
    for axis in range(3):
        other_axes = tuple(a for a in range(3) if a != axis)
        liver_extent = np.flatnonzero(liver_or_lesion.any(axis=other_axes))
        lesion_extent = np.flatnonzero(lesion.any(axis=other_axes))
        assert liver_extent[0] <= lesion_extent[0] and lesion_extent[-1] <= liver_extent[-1]
    ring = np.zeros_like(lesion)
    for neighbour in _face_neighbours(lesion):
        ring |= neighbour
    ring &= ~lesion
    assert np.mean(label[ring] == LIVER) > 0.9, "lesions should be surrounded by liver"


@pytest.mark.parametrize("seed", (0, 3))
def test_geometry_is_physical_under_anisotropic_spacing(seed):
    """Same 40 x 51.2 x 51.2 mm field of view, sampled at 2.5 mm and at 0.8 mm slices."""
    coarse_spacing, fine_spacing = (2.5, 0.8, 0.8), (0.8, 0.8, 0.8)
    _, coarse = make_phantom((16, 64, 64), coarse_spacing, seed)
    _, fine = make_phantom((50, 64, 64), fine_spacing, seed)
    for cls in (LIVER, KIDNEY):
        coarse_mm3 = (coarse == cls).sum() * math.prod(coarse_spacing)
        fine_mm3 = (fine == cls).sum() * math.prod(fine_spacing)
        assert abs(coarse_mm3 / fine_mm3 - 1) < 0.25, f"{SYNTH_CLASS_NAMES[cls]}: {coarse_mm3:.0f} vs {fine_mm3:.0f}"


@pytest.mark.parametrize(
    "shape", [(8, 8), (8, 8, 8, 8), (7, 32, 32), (16, 0, 32), (16.0, 32, 32), (True, 8, 8), 32, "abc"]
)
def test_bad_shape_raises(shape):
    with pytest.raises(ValueError, match="shape"):
        make_phantom(shape=shape)


@pytest.mark.parametrize(
    "spacing", [(1.0, 1.0), (0.0, 1.0, 1.0), (-1.0, 1.0, 1.0), (math.nan, 1, 1), (1, math.inf, 1), ("a", 1, 1), 1.0]
)
def test_bad_spacing_raises(spacing):
    with pytest.raises(ValueError, match="spacing"):
        make_phantom(shape=(8, 8, 8), spacing=spacing)


def test_module_depends_on_numpy_and_stdlib_only():
    """Conversion workers import this module: no torch, scipy or other heavy imports."""
    tree = ast.parse(Path(synth.__file__).read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "math", "collections", "dataclasses", "numpy"}
