"""The largest-error search and the three-plane panel through it, against planted errors."""

from __future__ import annotations

import numpy as np
import pytest

from iunet3d.tracking.error_planes import GAP, largest_error_center, three_plane_panel

NAMES = ["background", "liver", "tumour"]


def organ(shape=(40, 96, 96)) -> np.ndarray:
    """(D, H, W) uint8: a liver box with a tumour inside."""
    label = np.zeros(shape, np.uint8)
    label[8:32, 20:80, 16:70] = 1
    label[15:22, 40:55, 30:44] = 2
    return label


def test_the_centre_lands_in_a_planted_wrong_cube_among_scattered_errors():
    label = organ()
    prediction = label.copy()
    prediction[26:32, 60:66, 70:76] = 2  # a wrong 6x6x6 cube, partly outside the liver
    rng = np.random.default_rng(0)
    scattered = tuple(rng.integers(0, n, 60) for n in label.shape)  # sparse errors all over the volume
    prediction[scattered] = (label[scattered] + 1) % 3
    z, y, x = largest_error_center(label, prediction, (2.5, 0.8, 0.8))
    assert 26 <= z < 32 and 60 <= y < 66 and 70 <= x < 76
    assert label[z, y, x] != prediction[z, y, x]


def test_the_denser_of_two_error_regions_wins_and_ties_are_deterministic():
    label = np.zeros((30, 64, 64), np.int64)
    prediction = label.copy()
    prediction[3:7, 5:9, 5:9] = 1  # 64 errors
    prediction[20:26, 40:46, 40:46] = 1  # 216 errors
    assert largest_error_center(label, prediction, (1.0, 1.0, 1.0), radius_mm=5.0) == (22, 42, 42)
    twins = np.zeros((30, 64, 64), np.int64)
    twins[5:9, 5:9, 5:9] = 1
    twins[20:24, 40:44, 40:44] = 1
    first = largest_error_center(label, twins, (1.0, 1.0, 1.0), radius_mm=5.0)
    assert first == largest_error_center(label, twins.copy(), (1.0, 1.0, 1.0), radius_mm=5.0)
    assert all(5 <= v < 9 for v in first)  # the first in z, y, x order


def test_without_error_the_centre_is_on_the_foreground_else_the_volume_centre():
    label = organ()
    z, y, x = largest_error_center(label, label.copy(), (2.5, 0.8, 0.8))
    assert label[z, y, x] != 0
    assert abs(z - 19.5) <= 3 and abs(y - 49.5) <= 8 and abs(x - 42.5) <= 8  # near the liver's centre
    ring = np.zeros((10, 50, 50), np.int64)
    ring[:, 5:45, 5:45] = 1
    ring[:, 10:40, 10:40] = 0  # centroid in the hole: the centre is a foreground voxel nearby
    centre = largest_error_center(ring, ring, (1.0, 1.0, 1.0))
    assert ring[centre] == 1
    empty = np.zeros((9, 20, 31), np.int64)
    assert largest_error_center(empty, empty, (1.0, 1.0, 1.0)) == (4, 10, 15)


def test_three_planes_pass_through_the_centre_with_z_stretched_to_the_physical_aspect():
    label = organ()
    prediction = label.copy()
    prediction[26:32, 60:66, 70:76] = 2
    rng = np.random.default_rng(1)
    image = rng.normal(-200.0, 300.0, size=label.shape)
    spacing = (2.4, 0.8, 0.8)  # z stretched exactly 3x
    z, y, x = center = largest_error_center(label, prediction, spacing)
    panel = three_plane_panel("val/cases/case_3", image, label, prediction, center, spacing, NAMES)
    depth, height, width = label.shape
    assert panel.image.shape == panel.label.shape == panel.prediction.shape == (3 * depth, 2 * width + height + 2 * GAP)
    tiles = [
        (np.s_[:height, :width], lambda v: v[z]),
        (np.s_[: 3 * depth, width + GAP : 2 * width + GAP], lambda v: np.repeat(v[:, y, :], 3, axis=0)),
        (np.s_[: 3 * depth, 2 * width + 2 * GAP :], lambda v: np.repeat(v[:, :, x], 3, axis=0)),
    ]
    for where, plane in tiles:
        np.testing.assert_array_equal(panel.label[where], plane(label))
        np.testing.assert_array_equal(panel.prediction[where], plane(prediction))
        np.testing.assert_array_equal(panel.image[where], plane(image))
    # every tile shows the planted error; gaps and the space under the axial tile hold class 0 and the minimum
    for where, _ in tiles:
        assert (panel.label[where] != panel.prediction[where]).any()
    outside = np.ones(panel.label.shape, bool)
    for where, _ in tiles:
        outside[where] = False
    assert outside[:, width : width + GAP].all() and outside[height:, :width].all()
    assert (panel.label[outside] == 0).all() and (panel.prediction[outside] == 0).all()
    low = min(image[z].min(), image[:, y, :].min(), image[:, :, x].min())
    assert (panel.image[outside] == low).all()
    assert panel.caption == f"case_3: largest error at z={z} y={y} x={x} (axial | coronal | sagittal)"
    assert panel.class_names == NAMES and panel.key == "val/cases/case_3"


def test_anisotropic_spacing_stretches_coronal_and_sagittal_by_their_own_aspect():
    shape = (10, 30, 40)
    volume = np.arange(np.prod(shape)).reshape(shape) % 3
    panel = three_plane_panel("k", volume.astype(float), volume, volume, (5, 15, 20), (3.0, 1.0, 1.5), NAMES, "c")
    # coronal (D, W): 3.0 / 1.5 = 2 rows per slice; sagittal (D, H): 3.0 / 1.0 = 3 rows per slice
    assert panel.label.shape == (max(30, 30), 40 + 40 + 30 + 2 * GAP)
    np.testing.assert_array_equal(panel.label[:20, 40 + GAP : 80 + GAP], np.repeat(volume[:, 15, :], 2, axis=0))
    assert (panel.label[20:, 40 + GAP : 80 + GAP] == 0).all()
    np.testing.assert_array_equal(panel.label[:30, 80 + 2 * GAP :], np.repeat(volume[:, :, 20], 3, axis=0))
    assert panel.caption == "c"
    fine = three_plane_panel("k", volume.astype(float), volume, volume, (5, 15, 20), (0.5, 1.0, 1.0), NAMES)
    assert fine.label.shape == (30, 40 + 40 + 30 + 2 * GAP)  # thin slices: 10 rows become 5
    np.testing.assert_array_equal(fine.label[:5, 40 + GAP : 80 + GAP], volume[1::2, 15, :])
    assert fine.caption == "k: no error, planes at z=5 y=15 x=20 (axial | coronal | sagittal)"


def test_no_tile_side_exceeds_max_side():
    shape = (20, 600, 300)
    label = np.zeros(shape, np.int64)
    label[:, 300:, :150] = 1
    prediction = np.zeros(shape, np.int64)
    panel = three_plane_panel("k", np.zeros(shape), label, prediction, (10, 450, 75), (5.0, 1.0, 1.0), NAMES,
                              max_side=128)  # fmt: skip
    # axial (600, 300) -> (128, 64); coronal (100, 300) -> (43, 128); sagittal (100, 600) -> (21, 128)
    assert panel.label.shape == (128, 64 + 128 + 128 + 2 * GAP)
    axial = panel.label[:128, :64]
    assert (axial[64:, :32] == 1).all() and (axial[:64] == 0).all() and (axial[:, 32:] == 0).all()
    assert (panel.label[43:, 64 + GAP : 192 + GAP] == 0).all() and (panel.label[21:, 192 + 2 * GAP :] == 0).all()
    np.testing.assert_array_equal(panel.label[:21, 192 + 2 * GAP :], np.repeat([[0] * 64 + [1] * 64], 21, axis=0))


class PlaneReader:
    """A (D, H, W) array that records what is read from it (like a Zarr array: only indexed reads)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.reads = array, array.shape, []

    def __getitem__(self, index):
        self.reads.append(np.asarray(self.array[index]).size)
        return self.array[index]


def test_only_the_three_planes_are_read():
    label = organ((12, 20, 24))
    image, labels, predictions = (PlaneReader(v) for v in (label.astype(float), label, label))
    three_plane_panel("k", image, labels, predictions, (6, 10, 12), (1.0, 1.0, 1.0), NAMES)
    for reader in (image, labels, predictions):
        assert sorted(reader.reads) == sorted([20 * 24, 12 * 24, 12 * 20])


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"label": np.zeros((4, 5), int)}, "label"), ({"prediction": np.zeros((4, 5, 7), int)}, "prediction"),
     ({"label": np.zeros((4, 5, 6))}, "label"), ({"spacing": (1.0, 1.0)}, "spacing"),
     ({"spacing": (1.0, 0.0, 1.0)}, "spacing"), ({"radius_mm": 0.0}, "radius_mm")],
)  # fmt: skip
def test_largest_error_center_rejects_bad_input_naming_the_argument(kwargs, argument):
    arguments = {"label": np.zeros((4, 5, 6), int), "prediction": np.zeros((4, 5, 6), int), "spacing": (1, 1, 1)}
    with pytest.raises(ValueError, match=f"^{argument}: "):
        largest_error_center(**(arguments | kwargs))


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"image": np.zeros((4, 5))}, "image"), ({"label": np.zeros((4, 5, 7), int)}, "label"),
     ({"prediction": np.zeros((3, 5, 6), int)}, "prediction"), ({"center": (4, 0, 0)}, "center"),
     ({"center": (0, 0)}, "center"), ({"spacing": (1.0, -1.0, 1.0)}, "spacing"), ({"max_side": 0}, "max_side")],
)  # fmt: skip
def test_three_plane_panel_rejects_bad_input_naming_the_argument(kwargs, argument):
    volume = np.zeros((4, 5, 6), int)
    arguments = {"key": "k", "image": np.zeros((4, 5, 6)), "label": volume, "prediction": volume,
                 "center": (1, 2, 3), "spacing": (1.0, 1.0, 1.0), "class_names": NAMES}  # fmt: skip
    with pytest.raises(ValueError, match=f"^{argument}: "):
        three_plane_panel(**(arguments | kwargs))
