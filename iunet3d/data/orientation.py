"""Canonical voxel order for CT volumes, and its exact inverse.

Files come in any axis order and direction (sagittal stacks, flipped rows, oblique gantry tilts).
OME-Zarr 0.5 can only say "index * scale + translation", so each case is stored with its axes permuted
and flipped (no resampling, voxels unchanged) into the order closest to the patient frame: array axis x
runs to the patient's left, y to posterior, z to superior (ITK's LPS). Anything left over (an oblique
rotation) stays in the case's ``direction``. The original spacing, origin, direction and the
permutation are kept so that export restores the source geometry exactly.

Conventions: ``sitk`` geometry is in ITK index order (i, j, k) = (x, y, z); numpy arrays from SimpleITK
are indexed [k, j, i] = (z, y, x). ``direction`` is a row-major 3x3 whose column c is the physical
direction of index axis c.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a volume, in ITK (x, y, z) index order; physical = origin + D @ (spacing * i)."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 numbers, row-major 3x3

    def matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def to_dict(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_dict(cls, data: dict) -> Geometry:
        return cls(
            spacing=tuple(float(v) for v in data["spacing"]),
            origin=tuple(float(v) for v in data["origin"]),
            direction=tuple(float(v) for v in data["direction"]),
        )


@dataclass(frozen=True)
class Reorientation:
    """Canonical ITK axis c is source ITK axis ``permutation[c]``, reversed where ``flipped[c]``."""

    permutation: tuple[int, int, int]
    flipped: tuple[bool, bool, bool]

    def to_dict(self) -> dict:
        return {"permutation": list(self.permutation), "flipped": list(self.flipped)}

    @classmethod
    def from_dict(cls, data: dict) -> Reorientation:
        return cls(tuple(int(p) for p in data["permutation"]), tuple(bool(f) for f in data["flipped"]))


def closest_reorientation(direction: Sequence[float]) -> Reorientation:
    """The axis permutation and flips that bring ``direction`` closest to the identity."""
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    permutation = max(itertools.permutations(range(3)), key=lambda p: sum(abs(matrix[c, p[c]]) for c in range(3)))
    flipped = tuple(bool(matrix[c, permutation[c]] < 0) for c in range(3))
    return Reorientation(tuple(permutation), flipped)


def reorient_geometry(source: Geometry, shape_xyz: Sequence[int], reorientation: Reorientation) -> Geometry:
    """Geometry of the canonical volume; ``shape_xyz`` is the source size in ITK order."""
    matrix = source.matrix()
    columns, spacing = [], []
    origin = np.asarray(source.origin, dtype=np.float64)
    for c in range(3):
        axis = reorientation.permutation[c]
        column = matrix[:, axis].copy()
        if reorientation.flipped[c]:
            origin = origin + column * source.spacing[axis] * (shape_xyz[axis] - 1)
            column = -column
        columns.append(column)
        spacing.append(source.spacing[axis])
    canonical = np.stack(columns, axis=1)
    return Geometry(tuple(spacing), tuple(origin.tolist()), tuple(canonical.reshape(-1).tolist()))


def _array_axes(reorientation: Reorientation) -> tuple[int, int, int]:
    # Canonical array axis a holds ITK axis 2 - a, taken from source ITK axis permutation[2 - a],
    # which is source array axis 2 - permutation[2 - a].
    return tuple(2 - reorientation.permutation[2 - a] for a in range(3))


def to_canonical(array_zyx: np.ndarray, reorientation: Reorientation) -> np.ndarray:
    """Source array (z, y, x) -> canonical array (z, y, x); a view, no copy."""
    canonical = np.transpose(array_zyx, _array_axes(reorientation))
    flips = tuple(2 - c for c in range(3) if reorientation.flipped[c])
    return np.flip(canonical, axis=flips) if flips else canonical


def from_canonical(array_zyx: np.ndarray, reorientation: Reorientation) -> np.ndarray:
    """Inverse of :func:`to_canonical`; a view, no copy."""
    flips = tuple(2 - c for c in range(3) if reorientation.flipped[c])
    unflipped = np.flip(array_zyx, axis=flips) if flips else array_zyx
    return np.transpose(unflipped, np.argsort(_array_axes(reorientation)))


def zyx(values_xyz: Sequence[float]) -> list[float]:
    """ITK (x, y, z) order -> array (z, y, x) order."""
    return [float(v) for v in reversed(tuple(values_xyz))]
