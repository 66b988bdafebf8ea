"""A training patch at the target spacing: read the source region it covers, interpolate once.

A patch of ``P`` voxels (z, y, x) at the target spacing is placed in a case by ``first``, the source voxel
coordinate (float) of its first voxel; patch voxel ``p`` lies at ``first + p * ratio`` with
``ratio = target / case spacing``. When an affine augmentation is drawn, its rotation and zoom act in
millimetres about the patch centre and are folded into the same sampling grid, so the patch is
interpolated once, from the source voxels, whatever the spacing and the augmentation.

Only the source region the grid covers (plus the interpolation's support) is read. Image: linear
(trilinear) or cubic (Keys, separable; a patch that also gets a rotation or zoom is interpolated
trilinearly). Label: ``nearest``, or ``linear``: each class present is interpolated as a 0/1 mask and the
patch takes the class of the largest (smoother boundaries when the spacing changes a lot, at the cost of
one interpolation per class present).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from iunet3d.data.case_writer import IMAGE_FILL_HU
from iunet3d.data.dataset import CTCase
from iunet3d.data.resampling import interpolate_axis
from iunet3d.patches.augmentation import AugmentationConfig

LABEL_INTERPOLATIONS = ("nearest", "linear")
IMAGE_INTERPOLATIONS = ("linear", "cubic")
_SUPPORT = {"nearest": 1, "linear": 1, "cubic": 2}  #: source voxels read beyond the grid's extent, per side


@dataclass(frozen=True)
class PatchGrid:
    """Source voxel coordinates of a region of ``size`` target voxels (z, y, x).

    Axis-aligned (``matrix`` None): voxel ``q`` is at ``origin + q * ratio``. Otherwise at
    ``centre + matrix @ (q - (size - 1) / 2)`` (``matrix`` maps target voxel steps to source voxel steps).
    """

    size: tuple[int, int, int]
    origin: np.ndarray  #: (3,) source coordinate of region voxel 0 (axis-aligned)
    ratio: np.ndarray  #: (3,) source voxels per target voxel
    matrix: np.ndarray | None = None  #: (3, 3) with an affine augmentation

    @property
    def centre(self) -> np.ndarray:
        return self.origin + (np.asarray(self.size) - 1) / 2 * self.ratio

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) source coordinates over the region (inclusive)."""
        if self.matrix is None:
            last = self.origin + (np.asarray(self.size) - 1) * self.ratio
            return np.minimum(self.origin, last), np.maximum(self.origin, last)
        half = (np.asarray(self.size) - 1) / 2
        reach = np.abs(self.matrix) @ half
        return self.centre - reach, self.centre + reach

    def axis_coordinates(self) -> list[np.ndarray]:
        """Per axis, the source coordinates of the region's voxels (axis-aligned grids only)."""
        return [o + np.arange(n) * r for o, n, r in zip(self.origin, self.size, self.ratio, strict=True)]

    def points(self) -> np.ndarray:
        """(D, H, W, 3) source coordinates of every region voxel."""
        offsets = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in self.size], indexing="ij"), axis=-1)
        return self.centre + offsets @ self.matrix.T


def affine_matrix(rng: np.random.Generator, config: AugmentationConfig, target: Sequence[float],
                  spacing: Sequence[float]) -> np.ndarray:  # fmt: skip
    """(3, 3) target voxel step -> source voxel step for a random rotation (about z, y, x in turn, up to
    ``rotation_degrees``) and per-axis zoom (``scale_range``; > 1 makes structures larger), in millimetres."""
    angles = [math.radians(rng.uniform(-d, d)) for d in config.rotation_degrees]
    scales = rng.uniform(*config.scale_range, size=3)
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        i, j = (a for a in range(3) if a != axis)
        turn = np.eye(3)
        turn[i, i] = turn[j, j] = math.cos(angle)
        turn[i, j], turn[j, i] = -math.sin(angle), math.sin(angle)
        rotation = rotation @ turn
    millimetres = rotation @ np.diag(1.0 / scales)
    return np.diag(1.0 / np.asarray(spacing, dtype=float)) @ millimetres @ np.diag(np.asarray(target, dtype=float))


def patch_grid(first: Sequence[float], patch_size: Sequence[int], margin: Sequence[int], ratio: np.ndarray,
               matrix: np.ndarray | None) -> PatchGrid:  # fmt: skip
    """The grid of a patch whose first voxel is at source coordinate ``first``, with ``margin`` target voxels
    of context per side; rotated and zoomed about the patch centre by ``matrix`` when given."""
    patch, margin = np.asarray(patch_size), np.asarray(margin)
    centre = np.asarray(first, dtype=float) + (patch - 1) / 2 * ratio
    size = tuple(int(n) for n in patch + 2 * margin)
    origin = centre - (np.asarray(size) - 1) / 2 * ratio
    if matrix is not None:
        matrix = matrix.copy()
    return PatchGrid(size, origin, ratio, matrix)


def read_patch(case: CTCase, grid: PatchGrid, normalize: Callable[[np.ndarray], np.ndarray],
               image_order: str = "linear", label_order: str = "nearest") -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The normalised image float32 and the label uint8 of ``case`` sampled on ``grid`` (both ``grid.size``).

    Reads the source region the grid covers once (padded with air and background beyond the volume).
    """
    support = _SUPPORT[image_order if grid.matrix is None else "linear"]
    low, high = grid.bounds()
    start = np.floor(low).astype(int) - support
    stop = np.floor(high).astype(int) + support + 1
    size = stop - start
    image = normalize(case.read_image(start, size, pad_value=IMAGE_FILL_HU))
    label = case.read_label(start, size, pad_value=0)
    if grid.matrix is None:
        coordinates = [c - s for c, s in zip(grid.axis_coordinates(), start, strict=True)]
        return _separable(image, coordinates, image_order), _separable_label(label, coordinates, label_order)
    points = grid.points() - start
    return _sampled(image, points), _sampled_label(label, points, label_order)


def _separable(volume: np.ndarray, coordinates: list[np.ndarray], order: str) -> np.ndarray:
    for axis, points in enumerate(coordinates):
        volume = interpolate_axis(volume, axis, points, order)
    return volume


def _separable_label(label: np.ndarray, coordinates: list[np.ndarray], order: str) -> np.ndarray:
    if order == "nearest":
        return _separable(label, coordinates, "nearest")
    classes = np.unique(label)
    if len(classes) == 1:
        return np.full([len(c) for c in coordinates], classes[0], dtype=np.uint8)
    masks = np.stack([label == value for value in classes]).astype(np.float32)  # (C, d, h, w)
    for axis, points in enumerate(coordinates):
        masks = interpolate_axis(masks, axis + 1, points, "linear")
    return classes[masks.argmax(axis=0)].astype(np.uint8)


def _grid(points: np.ndarray, shape: Sequence[int]) -> torch.Tensor:
    """(1, D, H, W, 3) grid_sample coordinates (x, y, z order, align_corners=True) of (D, H, W, 3) points."""
    scale = np.array([2.0 / max(n - 1, 1) for n in shape])
    normalised = points * scale - 1.0
    return torch.from_numpy(normalised[..., ::-1].astype(np.float32).copy())[None]


def _sampled(volume: np.ndarray, points: np.ndarray, mode: str = "bilinear") -> np.ndarray:
    """``volume`` (..., d, h, w) trilinearly (or ``nearest``) sampled at ``points`` (D, H, W, 3), border kept."""
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    lead = tensor.shape[:-3]
    tensor = tensor.reshape(1, -1, *tensor.shape[-3:])
    out = F.grid_sample(tensor, _grid(points, volume.shape[-3:]), mode=mode, padding_mode="border", align_corners=True)
    return out.reshape(*lead, *points.shape[:3]).numpy()


def _sampled_label(label: np.ndarray, points: np.ndarray, order: str) -> np.ndarray:
    if order == "nearest":
        return _sampled(label, points, mode="nearest").round().astype(np.uint8)
    classes = np.unique(label)
    if len(classes) == 1:
        return np.full(points.shape[:3], classes[0], dtype=np.uint8)
    masks = np.stack([label == value for value in classes]).astype(np.float32)
    return classes[_sampled(masks, points).argmax(axis=0)].astype(np.uint8)
