"""Target spacing: the voxel size a network is trained and run at, and axis-aligned resampling onto it.

CT collections mix voxel sizes (in-plane 0.5-1.0 mm, slices 0.6-5 mm). A network sees the world in
voxels, so cases are resampled to one target spacing; nothing resampled is ever stored: patches and
prediction windows are interpolated from the regions they cover when they are read.

The target spacing ``"auto"`` picks from the dataset's spacing statistics: the median spacing per axis;
but when the coarsest axis of that median is more than ``ANISOTROPY_RATIO`` times the finest, that axis
takes its 10th percentile instead (so that the many thin-slice scans of a mostly thick-slice dataset keep
their detail), never finer than the other axes.

Grids: a volume of ``n`` voxels resampled to ``m`` keeps its field of view (the voxels' outer edges):
output voxel ``j`` sits at input coordinate ``(j + 0.5) * n / m - 0.5``, and ``m`` is ``n`` times the
spacing ratio, rounded. The same rule maps back, so the prediction on the target grid returns onto the
scan's own voxels. Interpolation is separable: linear (trilinear over three axes), cubic (Keys' cubic
convolution, a = -0.5) or nearest; coordinates beyond the input repeat its edge voxel. Only numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from iunet3d.data.case_writer import IMAGE_FILL_HU
from iunet3d.data.errors import DataError
from iunet3d.data.statistics import spacing_statistics

TARGET_SPACING_MODES = ("auto", "native")
INTERPOLATIONS = ("nearest", "linear", "cubic")
ANISOTROPY_RATIO = 3.0  #: a median spacing whose coarsest axis is more than this times its finest is anisotropic
SAME_SPACING_TOLERANCE = 1e-3  #: relative difference below which two spacings are the same
_TAPS = {"nearest": (0, 0), "linear": (0, 1), "cubic": (1, 2)}  #: input voxels used before/after floor(coordinate)


def check_target_spacing(value, what: str = "target_spacing") -> str | tuple[float, float, float]:
    """``"auto"``, ``"native"`` or three positive spacings (z, y, x) in mm; anything else fails naming ``what``."""
    if isinstance(value, str):
        if value not in TARGET_SPACING_MODES:
            raise DataError(f"{what}: expected 'auto', 'native' or [z, y, x] in mm, got {value!r}")
        return value
    values = tuple(value) if isinstance(value, Sequence | np.ndarray) else ()
    numeric = all(isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool) for v in values)
    if len(values) != 3 or not numeric or not all(math.isfinite(v) and v > 0 for v in values):
        raise DataError(f"{what}: expected 'auto', 'native' or three positive spacings [z, y, x] in mm, got {value!r}")
    return tuple(float(v) for v in values)


def check_interpolation(value: str, what: str, allowed: Sequence[str] = INTERPOLATIONS) -> str:
    if value not in allowed:
        raise DataError(f"{what}: expected one of {', '.join(allowed)}, got {value!r}")
    return value


def auto_target_spacing(statistics: dict) -> tuple[float, float, float]:
    """The spacing ``"auto"`` chooses from ``spacing_statistics`` (median, percentile_10 per axis)."""
    target = [float(v) for v in statistics["median"]]
    coarse = int(np.argmax(target))
    others = [target[axis] for axis in range(3) if axis != coarse]
    if target[coarse] > ANISOTROPY_RATIO * min(target):
        target[coarse] = max(float(statistics["percentile_10"][coarse]), max(others))
    return tuple(target)


def same_spacing(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(abs(x - y) <= SAME_SPACING_TOLERANCE * max(abs(x), abs(y)) for x, y in zip(a, b, strict=True))


def resolve_target_spacing(value, spacings: Sequence[Sequence[float]], what: str = "target_spacing"):
    """The spacing (z, y, x) mm that patches and predictions are resampled to, or None for the native grid.

    ``value``: ``"native"`` -> None; [z, y, x] -> itself; ``"auto"`` -> ``auto_target_spacing`` of the
    cases' ``spacings``, or None when every case already has that spacing (nothing to resample).
    """
    value = check_target_spacing(value, what)
    if value == "native":
        return None
    if value != "auto":
        return value
    if not len(spacings):
        raise DataError(f"{what}: 'auto' needs the spacings of at least one case")
    target = auto_target_spacing(spacing_statistics(spacings))
    return None if all(same_spacing(spacing, target) for spacing in spacings) else target


def dataset_target_spacing(dataset, value) -> tuple[float, float, float] | None:
    """``value`` (``"native"``, ``"auto"`` or [z, y, x] mm) resolved for a ``CTDataset`` (all its cases' spacings,
    as listed in its root): a spacing, or None for the cases' own voxels."""
    return resolve_target_spacing(value, [entry["spacing"] for entry in dataset.info.get("cases", [])])


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """The voxel count per axis of a volume of ``shape`` at ``spacing`` resampled to ``target`` (>= 1 each)."""
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True))


def grid_coordinates(out_size: int, in_size: int, start: int, stop: int) -> np.ndarray:
    """float64 (stop - start,): the input coordinates of output voxels ``start..stop-1`` (field of view kept)."""
    return (np.arange(start, stop, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5


def input_range(coordinates: np.ndarray, in_size: int, order: str) -> tuple[int, int]:
    """The input voxels [low, high) that interpolating at ``coordinates`` reads (clipped to the input)."""
    before, after = _TAPS[order]
    if order == "nearest":
        low, high = _nearest_index(coordinates.min()), _nearest_index(coordinates.max())
    else:
        low, high = np.floor(coordinates.min()) - before, np.floor(coordinates.max()) + after
    return int(np.clip(low, 0, in_size - 1)), int(np.clip(high, 0, in_size - 1)) + 1


def interpolate_axis(array: np.ndarray, axis: int, coordinates: np.ndarray, order: str) -> np.ndarray:
    """``array`` sampled along ``axis`` at ``coordinates`` (voxel indices of that axis, edges repeated).

    float32 for linear and cubic, the input dtype for nearest.
    """
    size = array.shape[axis]
    if order == "nearest":
        return np.take(array, np.clip(_nearest_index(coordinates), 0, size - 1), axis=axis)
    floor = np.floor(coordinates)
    fraction = (coordinates - floor).astype(np.float32)
    floor = floor.astype(np.int64)
    shape = [1] * array.ndim
    shape[axis] = len(coordinates)
    if order == "linear":
        offsets, weights = (0, 1), (1 - fraction, fraction)
    else:
        offsets, weights = (-1, 0, 1, 2), _keys_weights(fraction)
    if np.all(fraction == 0):  # on the input's voxels: a copy, no rounding
        return np.take(array, np.clip(floor, 0, size - 1), axis=axis).astype(np.float32)
    out = None
    for offset, weight in zip(offsets, weights, strict=True):
        taken = np.take(array, np.clip(floor + offset, 0, size - 1), axis=axis).astype(np.float32, copy=False)
        term = taken * weight.reshape(shape)
        out = term if out is None else out + term
    return out


def _nearest_index(coordinates) -> np.ndarray:
    """The nearest voxel index, halves rounded up: unlike np.rint (halves to even) the same voxel whatever
    integer offset the coordinates are taken relative to, so region reads agree with whole-volume reads."""
    floor = np.floor(coordinates)
    return (floor + (coordinates - floor >= 0.5)).astype(np.int64)


def _keys_weights(t: np.ndarray) -> tuple[np.ndarray, ...]:
    """Keys' cubic convolution weights (a = -0.5) of the taps at -1, 0, 1, 2 for fractions ``t``."""
    t2, t3 = t * t, t * t * t
    return (
        -0.5 * t3 + t2 - 0.5 * t,
        1.5 * t3 - 2.5 * t2 + 1,
        -1.5 * t3 + 2 * t2 + 0.5 * t,
        0.5 * t3 - 0.5 * t2,
    )


def resample_region(
    read: Callable[[tuple[slice, ...]], np.ndarray],
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    region: Sequence[slice],
    order: str = "linear",
) -> np.ndarray:
    """The output voxels ``region`` (z, y, x slices) of a volume of ``in_shape`` resampled to ``out_shape``.

    ``read(input region)`` returns the input there as (..., d, h, w) (leading axes, e.g. classes, are
    kept); only the input voxels the output region needs are read.
    """
    coordinates, reads = [], []
    for axis, (piece, n_in, n_out) in enumerate(zip(region, in_shape, out_shape, strict=True)):
        start, stop, _ = piece.indices(n_out)
        if stop <= start:
            raise DataError(f"resample_region: empty region along axis {axis}: {piece}")
        points = grid_coordinates(n_out, n_in, start, stop)
        low, high = input_range(points, n_in, order)
        coordinates.append(points - low)
        reads.append(slice(low, high))
    data = np.asarray(read(tuple(reads)))
    leading = data.ndim - 3
    for axis, points in enumerate(coordinates):
        data = interpolate_axis(data, leading + axis, points, order)
    return data


class ResampledVolume:
    """A volume seen at another spacing, computed region by region when indexed; nothing is kept.

    ``volume[z0:z1, y0:y1, x0:x1]`` is float32, interpolated from the source region it covers (read from
    ``array``, e.g. a Zarr array, and passed through ``normalize`` first). Only step-1 slices are supported.

    Args:
        array: (D, H, W) source, indexable with slices.
        spacing, target: source and target spacing (z, y, x) mm.
        normalize: applied to each source region before interpolation (e.g. HU -> network input).
        order: ``"linear"`` or ``"cubic"`` (``"nearest"`` too).

    ``fill_value`` is what a window reaching beyond the volume is padded with: air (``IMAGE_FILL_HU``)
    passed through ``normalize``, as the regions are.
    """

    def __init__(self, array, spacing: Sequence[float], target: Sequence[float],
                 normalize: Callable[[np.ndarray], np.ndarray] | None = None, order: str = "linear"):  # fmt: skip
        self.array, self.normalize, self.order = array, normalize, check_interpolation(order, "interpolation")
        self.source_shape = tuple(array.shape)
        self.spacing, self.target = tuple(spacing), tuple(target)
        self.shape = resampled_shape(self.source_shape, self.spacing, self.target)
        self.ndim, self.dtype = 3, np.dtype(np.float32)
        fill = np.full((1, 1, 1), IMAGE_FILL_HU, dtype=np.int16)
        self.fill_value = float(IMAGE_FILL_HU if normalize is None else np.asarray(normalize(fill)).ravel()[0])

    def _read(self, region: tuple[slice, ...]) -> np.ndarray:
        data = np.asarray(self.array[region])
        return data if self.normalize is None else self.normalize(data)

    def __getitem__(self, region) -> np.ndarray:
        region = region if isinstance(region, tuple) else (region,)
        region = tuple(region) + (slice(None),) * (3 - len(region))
        if len(region) != 3 or not all(isinstance(piece, slice) and piece.step in (None, 1) for piece in region):
            raise DataError(f"ResampledVolume: index with three step-1 slices (z, y, x), got {region!r}")
        out = resample_region(self._read, self.source_shape, self.shape, region, self.order)
        return out.astype(np.float32, copy=False)
