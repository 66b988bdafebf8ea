"""Where a prediction is most wrong, and three orthogonal planes through that place as one dashboard image.

``largest_error_center`` counts the misclassified voxels in cells of about a fifth of the search box per axis,
sums the counts over boxes of about +-``radius_mm`` with cumulative sums, and refines inside the densest box at
full resolution. ``three_plane_panel`` reads only the three planes through that voxel (the image may be a Zarr
array) and tiles them side by side as one ``SegmentationPanel``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from iunet3d.tracking.wandb_run import SegmentationPanel

#: pixels between the tiles of a three-plane panel (image: the planes' minimum; masks: class 0)
GAP = 4
#: cells per axis of a search box (the box spans about ``BOX_CELLS`` cells of counts)
BOX_CELLS = 4
#: at most this many cells per axis, so that the box sums stay cheap for any volume size
MAX_CELLS = 128


def largest_error_center(label: np.ndarray, prediction: np.ndarray, spacing: Sequence[float],
                         radius_mm: float = 15.0) -> tuple[int, int, int]:  # fmt: skip
    """The voxel (z, y, x) around which the misclassified voxels are densest.

    label, prediction: (D, H, W) integer class maps; spacing: (z, y, x) voxel size in mm. The densest box of about
    +-``radius_mm`` per axis is found on a grid of cells (the first in z, y, x order on a tie); the centre is then
    the misclassified voxel of that box nearest (in mm) to the centroid of its misclassified voxels (the first in
    z, y, x order on a tie), so it always lies on an error. Without any error: a foreground voxel of ``label`` near
    the centroid of its foreground (in the occupied cell nearest to it); without foreground either: the volume
    centre.
    """
    label, prediction = np.asarray(label), np.asarray(prediction)
    _check_volume("label", label)
    _check_volume("prediction", prediction)
    if prediction.shape != label.shape:
        raise ValueError(f"prediction: expected the shape of label {label.shape}, got {prediction.shape}")
    spacing = _check_spacing(spacing)
    if not (isinstance(radius_mm, int | float) and math.isfinite(radius_mm) and radius_mm > 0):
        raise ValueError(f"radius_mm: expected a positive number of mm, got {radius_mm!r}")
    errors = label != prediction
    cells, reach = _grid(label.shape, spacing, radius_mm)
    if errors.any():
        box = _box_sums(_cell_counts(errors, cells), reach)
        best = np.unravel_index(int(np.argmax(box)), box.shape)
        region = tuple(slice(max(i - r, 0) * c, min((i + r + 1) * c, n))
                       for i, r, c, n in zip(best, reach, cells, label.shape, strict=True))  # fmt: skip
        inside = np.argwhere(errors[region])
        start = np.array([s.start for s in region])
        return _nearest(inside + start, (inside + start).mean(axis=0), spacing)
    foreground = label != 0
    if not foreground.any():
        return tuple(n // 2 for n in label.shape)
    counts = _cell_counts(foreground, cells)
    occupied = np.argwhere(counts > 0)
    middles = (occupied * cells + (np.array(cells) - 1) / 2).clip(max=np.array(label.shape) - 1)
    weights = counts[tuple(occupied.T)].astype(np.float64)
    centroid = (middles * weights[:, None]).sum(axis=0) / weights.sum()  # within half a cell of the true one
    cell = occupied[int(np.argmin((((middles - centroid) * spacing) ** 2).sum(axis=1)))]
    region = tuple(slice(i * c, (i + 1) * c) for i, c in zip(cell, cells, strict=True))
    start = np.array([s.start for s in region])
    return _nearest(np.argwhere(foreground[region]) + start, centroid, spacing)


def three_plane_panel(key: str, image, label, prediction, center: Sequence[int], spacing: Sequence[float],
                      class_names: list[str], caption: str = "", max_side: int = 512,
                      normalize: Callable[[np.ndarray], np.ndarray] | None = None) -> SegmentationPanel:  # fmt: skip
    """Axial (H, W) at z, coronal (D, W) at y and sagittal (D, H) at x through ``center`` (z, y, x), side by side.

    image: (D, H, W) float, any numpy-indexable array (a Zarr array: only the three planes are read);
    label, prediction: (D, H, W) integer class maps, indexed the same way; spacing: (z, y, x) mm; ``normalize``
    (e.g. the network's ``CTNormalization``) maps each image plane read for display. Coronal and
    sagittal planes are resampled along z by nearest neighbour to their physical aspect (rows times
    spacing z / spacing x, resp. spacing z / spacing y); then every plane larger than ``max_side`` on a side is
    scaled down (nearest neighbour, the same indices for image and masks) to fit. Tiles are top-aligned,
    ``GAP`` pixels apart; the space around them holds the planes' minimum in the image and class 0 in the masks.
    The panel's image, label and prediction are (rows, cols): rows the tallest tile, cols the tile widths plus
    two gaps. An empty ``caption`` becomes e.g. "case_3: largest error at z=40 y=201 x=310 (axial | coronal |
    sagittal)" (``key``'s last part; "no error, planes at" when the three planes hold no error).
    """
    shape = _shape("image", image)
    for name, volume in (("label", label), ("prediction", prediction)):
        if _shape(name, volume) != shape:
            raise ValueError(f"{name}: expected the shape of image {shape}, got {_shape(name, volume)}")
    spacing = _check_spacing(spacing)
    inside = len(center) == 3 and all(0 <= v < n for v, n in zip(center, shape, strict=False))
    if not (inside and all(isinstance(v, int | np.integer) for v in center)):
        raise ValueError(f"center: expected three integer indices (z, y, x) inside {shape}, got {tuple(center)}")
    if not isinstance(max_side, int | np.integer) or max_side < 1:
        raise ValueError(f"max_side: expected a positive number of pixels, got {max_side!r}")
    z, y, x = (int(v) for v in center)
    planes = [(np.s_[z], 1.0), (np.s_[:, y, :], spacing[0] / spacing[2]), (np.s_[:, :, x], spacing[0] / spacing[1])]
    tiles = []
    for index, stretch in planes:
        plane_image, plane_label, plane_prediction = (np.asarray(v[index]) for v in (image, label, prediction))
        plane_image = plane_image if normalize is None else np.asarray(normalize(plane_image))
        rows, cols = _fit(plane_image.shape, stretch, max_side)
        grid = np.ix_(_nearest_indices(plane_image.shape[0], rows), _nearest_indices(plane_image.shape[1], cols))
        tiles.append((plane_image[grid], plane_label[grid], plane_prediction[grid]))
    height = max(tile[0].shape[0] for tile in tiles)
    width = sum(tile[0].shape[1] for tile in tiles) + GAP * (len(tiles) - 1)
    values = np.concatenate([tile[0].ravel() for tile in tiles]).astype(np.float64)
    low = float(np.nanmin(values)) if not np.isnan(values).all() else 0.0
    out_image = np.full((height, width), low, dtype=np.float64)
    out_label = np.zeros((height, width), dtype=np.int64)
    out_prediction = np.zeros((height, width), dtype=np.int64)
    column = 0
    errors = False
    for tile_image, tile_label, tile_prediction in tiles:
        rows, cols = tile_image.shape
        out_image[:rows, column : column + cols] = tile_image
        out_label[:rows, column : column + cols] = tile_label
        out_prediction[:rows, column : column + cols] = tile_prediction
        errors = errors or bool((tile_label != tile_prediction).any())
        column += cols + GAP
    if not caption:
        where = "largest error at" if errors else "no error, planes at"
        caption = f"{key.rsplit('/', 1)[-1]}: {where} z={z} y={y} x={x} (axial | coronal | sagittal)"
    return SegmentationPanel(key, out_image, out_label, out_prediction, list(class_names), caption)


def _check_volume(name: str, volume: np.ndarray) -> None:
    if volume.ndim != 3 or volume.size == 0:
        raise ValueError(f"{name}: expected a non-empty (D, H, W) volume, got shape {volume.shape}")
    if not (np.issubdtype(volume.dtype, np.integer) or volume.dtype == np.bool_):
        raise ValueError(f"{name}: expected integer classes, got dtype {volume.dtype}")


def _shape(name: str, volume) -> tuple[int, ...]:
    shape = tuple(int(n) for n in np.shape(volume))
    if len(shape) != 3 or 0 in shape:
        raise ValueError(f"{name}: expected a non-empty (D, H, W) volume, got shape {shape}")
    return shape


def _check_spacing(spacing: Sequence[float]) -> np.ndarray:
    values = np.asarray(spacing, dtype=np.float64) if np.ndim(spacing) == 1 else np.zeros(0)
    if values.shape != (3,) or not (np.isfinite(values).all() and (values > 0).all()):
        raise ValueError(f"spacing: expected three positive voxel sizes (z, y, x) in mm, got {spacing!r}")
    return values


def _grid(shape: tuple[int, ...], spacing: np.ndarray, radius_mm: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Cell sizes (voxels per cell, per axis) and the box reach in cells (a box spans ``2 * reach + 1`` cells)."""
    cells, reach = [], []
    for n, size in zip(shape, spacing, strict=True):
        width = 2 * radius_mm / size + 1  # voxels across the box
        cell = min(255, max(1, int(width // BOX_CELLS), math.ceil(n / MAX_CELLS)))
        cells.append(cell)
        reach.append(max(0, round((width / cell - 1) / 2)))
    return tuple(cells), tuple(reach)


def _cell_counts(mask: np.ndarray, cells: tuple[int, ...]) -> np.ndarray:
    """(ceil(D / cz), ceil(H / cy), ceil(W / cx)) int32: the true voxels of ``mask`` (D, H, W) bool per cell.

    Each axis is summed as ``cell`` strided slices (whole rows at a time; ``np.add.reduceat`` is ten times
    slower), the larger of the z and y cells first and x, whose slices are not contiguous, last.
    """
    counts = mask.view(np.uint8)
    dtypes = iter((np.uint8, np.uint16, np.int32))  # cells < 2**8 per axis: no overflow
    for axis in [*sorted((0, 1), key=lambda a: -cells[a]), 2]:
        cell = cells[axis]
        if cell == 1:
            continue
        every = [slice(None)] * 3
        every[axis] = slice(0, None, cell)
        total = counts[tuple(every)].astype(next(dtypes))
        for offset in range(1, cell):
            every[axis] = slice(offset, None, cell)
            part = counts[tuple(every)]
            total[tuple(slice(0, n) for n in part.shape)] += part
        counts = total
    return counts.astype(np.int32)


def _box_sums(counts: np.ndarray, reach: tuple[int, ...]) -> np.ndarray:
    """Sums of ``counts`` over boxes of ``2 * reach + 1`` cells per axis (clipped at the edges), same shape."""
    sums = counts.astype(np.int64)
    for axis, r in enumerate(reach):
        if r == 0:
            continue
        n = sums.shape[axis]
        cumulative = np.moveaxis(sums.cumsum(axis=axis), axis, 0)  # cumulative[i]: sum of cells 0..i
        boxes = cumulative[np.minimum(np.arange(n) + r, n - 1)]
        boxes[r + 1 :] -= cumulative[: max(n - r - 1, 0)]
        sums = np.moveaxis(boxes, 0, axis)
    return sums


def _nearest(points: np.ndarray, target: np.ndarray, spacing: np.ndarray) -> tuple[int, int, int]:
    """The row of ``points`` (N, 3) nearest in mm to ``target`` (3,); the first one on a tie."""
    distances = (((points - target) * spacing) ** 2).sum(axis=1)
    return tuple(int(v) for v in points[int(np.argmin(distances))])


def _fit(shape: tuple[int, int], stretch: float, max_side: int) -> tuple[int, int]:
    """(rows, cols) of a plane of ``shape`` with its rows stretched by ``stretch``, scaled to fit ``max_side``."""
    rows, cols = max(1, round(shape[0] * stretch)), shape[1]
    if max(rows, cols) > max_side:
        scale = max_side / max(rows, cols)
        rows, cols = max(1, min(max_side, round(rows * scale))), max(1, min(max_side, round(cols * scale)))
    return rows, cols


def _nearest_indices(source: int, target: int) -> np.ndarray:
    """Nearest-neighbour indices into ``source`` samples for ``target`` evenly spaced samples."""
    return np.minimum(((np.arange(target) + 0.5) * (source / target)).astype(np.int64), source - 1)
