"""Target spacing and axis-aligned resampling (``iunet3d.data.resampling``): the "auto" rule, resolution,
field-of-view-keeping grids, exactness of linear/cubic/nearest interpolation, seamless region reads and
``ResampledVolume``'s reads."""

import numpy as np
import pytest

from iunet3d.data.case_writer import IMAGE_FILL_HU
from iunet3d.data.errors import DataError
from iunet3d.data.resampling import (
    ANISOTROPY_RATIO,
    ResampledVolume,
    auto_target_spacing,
    check_interpolation,
    check_target_spacing,
    resample_region,
    resampled_shape,
    resolve_target_spacing,
)
from iunet3d.data.statistics import spacing_statistics

ALL = (slice(None),) * 3


def resample(volume: np.ndarray, out_shape, order: str, region=ALL) -> np.ndarray:
    """``region`` of ``volume`` (..., d, h, w) resampled to ``out_shape`` (d, h, w)."""
    return resample_region(lambda piece: volume[(Ellipsis, *piece)], volume.shape[-3:], out_shape, region, order)


def grid(shape, out_shape=None) -> tuple[np.ndarray, ...]:
    """Open (z, y, x) coordinates, in input voxels, of the voxel centres of ``shape`` resampled to ``out_shape``."""
    out_shape = out_shape or shape
    axes = [(np.arange(m) + 0.5) * n / m - 0.5 for n, m in zip(shape, out_shape, strict=True)]
    return np.ix_(*axes)


class RecordingArray:
    """A (d, h, w) array that records the index of every read."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape, self.reads = array, array.shape, []

    def __getitem__(self, index):
        self.reads.append(index)
        return self.array[index]


# -- target spacing values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", "auto"), ("native", "native"), ([2, 0.8, 0.8], (2.0, 0.8, 0.8)), (np.array([1.5, 1, 1]), (1.5, 1, 1))],
)
def test_check_target_spacing_accepts_modes_and_three_positive_spacings(value, expected):
    checked = check_target_spacing(value)
    assert checked == expected
    assert isinstance(checked, str) or all(type(v) is float for v in checked)


@pytest.mark.parametrize(
    "value", ["Auto", "median", [1, 1], [1, 1, 1, 1], [1, 0, 1], [1, -1, 1], [1, float("nan"), 1], [True, 1, 1],
              ["1", 1, 1], 2.5, None, {"z": 1}],
)  # fmt: skip
def test_check_target_spacing_refuses_anything_else_naming_the_key(value):
    with pytest.raises(DataError, match=r"^data\.target_spacing: expected 'auto', 'native'"):
        check_target_spacing(value, "data.target_spacing")


def test_check_interpolation():
    assert check_interpolation("cubic", "interpolation") == "cubic"
    with pytest.raises(DataError, match=r"^label_interpolation: expected one of nearest, linear, cubic, got 'spline'"):
        check_interpolation("spline", "label_interpolation")


# -- the "auto" rule ---------------------------------------------------------------------------------------------


def test_auto_takes_the_median_of_an_isotropic_dataset():
    statistics = spacing_statistics([[1.0, 0.9, 0.9], [1.2, 1.0, 1.0], [0.8, 0.7, 0.7]])
    assert auto_target_spacing(statistics) == pytest.approx((1.0, 0.9, 0.9))


def test_auto_takes_the_10th_percentile_of_the_coarse_axis_of_an_anisotropic_dataset():
    statistics = {"median": [5.0, 0.8, 0.8], "percentile_10": [1.25, 0.7, 0.7]}  # mostly thick slices, some thin
    assert auto_target_spacing(statistics) == (1.25, 0.8, 0.8)
    statistics = {"median": [0.7, 0.8, 3.0], "percentile_10": [0.6, 0.7, 1.0]}  # the coarse axis need not be z
    assert auto_target_spacing(statistics) == (0.7, 0.8, 1.0)


def test_auto_never_makes_the_coarse_axis_finer_than_the_other_axes():
    statistics = {"median": [5.0, 0.8, 1.0], "percentile_10": [0.5, 0.7, 0.9]}
    assert auto_target_spacing(statistics) == (1.0, 0.8, 1.0)  # not 0.5: the coarsest other axis


def test_auto_keeps_the_median_up_to_three_times_the_finest_axis():
    assert ANISOTROPY_RATIO == 3.0
    at_boundary = {"median": [2.4, 0.8, 0.8], "percentile_10": [1.0, 0.8, 0.8]}
    assert auto_target_spacing(at_boundary) == (2.4, 0.8, 0.8)  # exactly 3x: not anisotropic
    beyond = {"median": [2.5, 0.8, 0.8], "percentile_10": [1.0, 0.8, 0.8]}
    assert auto_target_spacing(beyond) == (1.0, 0.8, 0.8)


def test_resolve_returns_none_for_a_uniform_dataset_and_the_spacing_otherwise():
    uniform = [[2.5, 0.8, 0.8]] * 3
    assert resolve_target_spacing("auto", uniform) is None
    assert resolve_target_spacing("auto", [[2.5, 0.8, 0.8], [2.5 * (1 + 1e-4), 0.8, 0.8]]) is None  # within tolerance
    assert resolve_target_spacing("native", [[1, 1, 1], [5, 1, 1]]) is None
    assert resolve_target_spacing([2, 1, 1], uniform) == (2.0, 1.0, 1.0)  # given: even when every case has another
    mixed = [[5.0, 0.8, 0.8]] * 8 + [[1.0, 0.8, 0.8]] * 2
    target = resolve_target_spacing("auto", mixed)
    assert isinstance(target, tuple) and target == pytest.approx(auto_target_spacing(spacing_statistics(mixed)))
    assert target[0] < 5.0  # the thin-slice cases pulled it down
    assert resolve_target_spacing("auto", [[1.0, 0.8, 0.8], [1.2, 0.8, 0.8]]) == pytest.approx((1.1, 0.8, 0.8))
    with pytest.raises(DataError, match="^target_spacing: 'auto' needs the spacings of at least one case"):
        resolve_target_spacing("auto", [])
    with pytest.raises(DataError, match="^data.target_spacing: expected"):
        resolve_target_spacing("fine", uniform, "data.target_spacing")


def test_resampled_shape_keeps_the_field_of_view():
    assert resampled_shape((16, 32, 32), (2.5, 0.8, 0.8), (1.0, 0.8, 0.8)) == (40, 32, 32)
    assert resampled_shape((40, 33, 30), (1.0, 0.8, 0.8), (2.5, 1.6, 1.5)) == (16, 16, 16)  # 16.5 -> 16 (even)
    assert resampled_shape((3, 3, 3), (1, 1, 1), (10, 10, 10)) == (1, 1, 1)  # at least one voxel
    assert all(type(n) is int for n in resampled_shape((7, 7, 7), (1, 1, 1), (0.7, 0.7, 0.7)))


# -- interpolation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["nearest", "linear", "cubic"])
def test_equal_spacing_is_the_identity_exactly(order):
    volume = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    out = resample(volume, volume.shape, order)
    np.testing.assert_array_equal(out, volume)
    region = (slice(1, 4), slice(2, 7), slice(0, 3))
    np.testing.assert_array_equal(resample(volume, volume.shape, order, region), volume[region])


def test_linear_resampling_of_a_linear_ramp_is_exact_in_the_interior():
    shape, out_shape = (10, 12, 14), (23, 7, 19)
    ramp = lambda z, y, x: 3.0 * z - 2.0 * y + 0.5 * x + 7  # noqa: E731
    volume = ramp(*np.indices(shape)).astype(np.float32)
    out = resample(volume, out_shape, "linear")
    z, y, x = grid(shape, out_shape)
    expected = np.broadcast_to(ramp(z, y, x), out_shape)
    interior = tuple(
        (c.ravel() >= 0) & (c.ravel() <= n - 1) for c, n in zip((z, y, x), shape, strict=True)
    )  # beyond the outer voxel centres the edge voxel repeats
    inner = np.ix_(*interior)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[inner], expected[inner], rtol=0, atol=1e-4)
    assert not np.allclose(out, expected, atol=1e-2)  # but not at the border (edges repeat)


def test_cubic_reproduces_a_quadratic_exactly_in_the_interior():
    shape, out_shape = (12, 11, 13), (29, 7, 20)
    quadratic = lambda z, y, x: 0.5 * z**2 - 0.3 * y * x + 0.2 * x**2 + y - 4  # noqa: E731
    volume = quadratic(*np.indices(shape).astype(np.float64)).astype(np.float32)
    out = resample(volume, out_shape, "cubic")
    z, y, x = grid(shape, out_shape)
    expected = np.broadcast_to(quadratic(z, y, x), out_shape)
    interior = np.ix_(*((c.ravel() >= 1) & (c.ravel() <= n - 2) for c, n in zip((z, y, x), shape, strict=True)))
    np.testing.assert_allclose(out[interior], expected[interior], rtol=0, atol=2e-3)
    linear = resample(volume, out_shape, "linear")
    assert np.abs(linear[interior] - expected[interior]).max() > 0.01  # linear does not


def test_nearest_keeps_label_values_and_dtype():
    label = np.random.default_rng(1).integers(0, 4, size=(8, 9, 10)).astype(np.uint8)
    label[label == 2] = 7
    for out_shape in ((20, 4, 10), (3, 18, 5)):
        out = resample(label, out_shape, "nearest")
        assert out.dtype == np.uint8 and out.shape == out_shape
        assert set(np.unique(out)) <= {0, 1, 3, 7}
        nearest = [
            np.clip(np.floor(c + 0.5), 0, n - 1).astype(int)
            for c, n in zip(grid(label.shape, out_shape), label.shape, strict=True)
        ]
        np.testing.assert_array_equal(out, label[tuple(nearest)])  # halves round up (8 -> 3: z 3.5 -> voxel 4)


@pytest.mark.parametrize("order", ["nearest", "linear", "cubic"])
def test_region_reads_equal_the_same_region_of_the_whole_resampled_volume(order):
    """Region-wise resampling is seamless: any region read alone is that region of the whole (nearest included,
    where 8 -> 3 voxels puts output z 1 exactly half-way, at input z 3.5, whatever input voxel a read starts at)."""
    volume = np.random.default_rng(2).normal(size=(9, 13, 8)).astype(np.float32)
    out_shape = (22, 6, 3)
    whole = resample(volume, out_shape, order)
    for region in [(slice(0, 5), slice(0, 3), slice(0, 3)), (slice(7, 22), slice(2, 6), slice(1, 3)),
                   (slice(10, 11), slice(5, 6), slice(2, 3)), (slice(3, 19), slice(1, 5), slice(1, 2))]:  # fmt: skip
        np.testing.assert_array_equal(resample(volume, out_shape, order, region), whole[region])


@pytest.mark.parametrize("order", ["linear", "cubic"])
def test_down_then_up_round_trip_of_a_smooth_volume_is_close(order):
    shape = (24, 24, 24)
    z, y, x = np.indices(shape) / 24.0
    volume = (np.sin(2 * np.pi * z) * np.cos(np.pi * y) + x**2).astype(np.float32)
    down = resample(volume, (12, 16, 24), order)
    back = resample(down, shape, order)
    error = np.abs(back - volume)
    assert error[(slice(3, -3),) * 3].max() < {"linear": 0.05, "cubic": 0.005}[order]
    assert error.mean() < 0.03  # the border too, where edge voxels repeat


def test_leading_channel_axes_are_kept():
    volume = np.random.default_rng(3).normal(size=(2, 3, 6, 7, 8)).astype(np.float32)
    out = resample(volume, (12, 4, 8), "linear")
    assert out.shape == (2, 3, 12, 4, 8)
    np.testing.assert_allclose(out[1, 2], resample(volume[1, 2], (12, 4, 8), "linear"), rtol=0, atol=1e-6)


def test_an_empty_region_is_an_error():
    with pytest.raises(DataError, match="empty region along axis 1"):
        resample(np.zeros((4, 4, 4), np.float32), (8, 8, 8), "linear", (slice(0, 2), slice(3, 3), slice(None)))


# -- ResampledVolume ---------------------------------------------------------------------------------------------


def test_resampled_volume_reads_only_the_source_region_it_needs():
    source = np.random.default_rng(4).integers(-1000, 1000, size=(20, 30, 30)).astype(np.int16)
    recording = RecordingArray(source)
    volume = ResampledVolume(recording, (2.5, 0.8, 0.8), (1.0, 1.6, 0.8), order="linear")
    assert volume.shape == (50, 15, 30) and volume.ndim == 3 and volume.dtype == np.float32
    patch = volume[10:20, 3:7, 4:12]
    assert patch.shape == (10, 4, 8) and patch.dtype == np.float32
    assert len(recording.reads) == 1
    (zs, ys, xs) = recording.reads[0]
    # output z 10..19 (1 mm) sit at input z 3.7..7.3, output y 3..6 (1.6 mm) at input y 6.5..12.5, x on its grid
    assert (zs.start, zs.stop) == (3, 9) and (ys.start, ys.stop) == (6, 14) and (xs.start, xs.stop) == (4, 13)
    np.testing.assert_allclose(patch, resample(source.astype(np.float32), volume.shape, "linear")[10:20, 3:7, 4:12],
                               rtol=0, atol=1e-3)  # fmt: skip
    cubic = ResampledVolume(RecordingArray(source), (2.5, 0.8, 0.8), (1.0, 1.6, 0.8), order="cubic")
    cubic[10:20, 3:7, 4:12]
    zs, ys, xs = cubic.array.reads[0]
    assert (zs.start, zs.stop) == (2, 10) and (ys.start, ys.stop) == (5, 15)  # one more voxel each side


def test_resampled_volume_normalises_regions_and_fills_with_normalised_air():
    source = np.full((8, 8, 8), 40, np.int16)
    normalize = lambda hu: (np.asarray(hu, np.float32) - 100) / 50  # noqa: E731
    volume = ResampledVolume(source, (2.0, 1.0, 1.0), (1.0, 1.0, 1.0), normalize=normalize)
    assert volume.fill_value == pytest.approx((IMAGE_FILL_HU - 100) / 50)
    np.testing.assert_allclose(volume[0:4, 0:2, 0:2], -1.2, rtol=0, atol=1e-6)
    assert ResampledVolume(source, (2.0, 1.0, 1.0), (1.0, 1.0, 1.0)).fill_value == IMAGE_FILL_HU
    assert volume[2:5].shape == (3, 8, 8)  # missing trailing axes are whole


@pytest.mark.parametrize(
    "index", [3, (slice(0, 2), 1, slice(None)), (slice(0, 4, 2),) * 3, (slice(None),) * 4, Ellipsis, (slice(2, 2),) * 3]
)
def test_resampled_volume_bad_indices_are_data_errors(index):
    volume = ResampledVolume(np.zeros((4, 4, 4), np.int16), (2.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    with pytest.raises(DataError):
        volume[index]


def test_resampled_volume_refuses_an_unknown_interpolation():
    with pytest.raises(DataError, match="^interpolation: expected one of nearest, linear, cubic, got 'quadratic'"):
        ResampledVolume(np.zeros((4, 4, 4), np.int16), (1, 1, 1), (1, 1, 1), order="quadratic")
