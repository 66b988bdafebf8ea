"""The shape of a planned network and its patches: strides per level, number of levels, patch size.

Rules (in voxels of the target spacing, axes z, y, x):

- **Strides.** Between two levels an axis is halved only while its current spacing (target spacing times
  the strides so far) is within ``POOLING_ANISOTROPY`` (2x) of the finest current spacing, and only while
  the patch keeps at least ``MIN_BOTTLENECK`` voxels along it afterwards. Thick-slice CT (5 x 0.7 x 0.7 mm)
  therefore gets ``(1, 2, 2)`` until the in-plane spacing has caught up with z; isotropic data gets
  ``(2, 2, 2)`` everywhere. Strides are 1 or 2 (Haar-initialised invertible resampling).
- **Levels.** New levels are added while some axis can still be halved, up to ``MAX_LEVELS``: the
  bottleneck has at least ``MIN_BOTTLENECK`` voxels per axis.
- **Patch.** For a voxel budget, the patch covers the same extent in millimetres along every axis (its
  size per axis is proportional to 1 / spacing), clipped to the median case shape (the voxels an axis
  cannot use go to the others), then rounded down to a multiple of the total downsampling per axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MIN_BOTTLENECK = 4  #: voxels per axis at the lowest level
POOLING_ANISOTROPY = 2.0  #: an axis is halved while its spacing is within this factor of the finest
MAX_LEVELS = 6


def level_strides(spacing: Sequence[float], patch_size: Sequence[int], max_levels: int = MAX_LEVELS) -> list[tuple]:
    """Strides (z, y, x) between consecutive levels for a patch of ``patch_size`` voxels at ``spacing`` mm."""
    current, size = [float(s) for s in spacing], [int(p) for p in patch_size]
    strides: list[tuple[int, int, int]] = []
    while len(strides) < max_levels - 1:
        finest = min(current)
        stride = tuple(
            2 if current[axis] <= POOLING_ANISOTROPY * finest and size[axis] // 2 >= MIN_BOTTLENECK else 1
            for axis in range(3)
        )
        if stride == (1, 1, 1):
            break
        strides.append(stride)
        current = [c * s for c, s in zip(current, stride, strict=True)]
        size = [n // s for n, s in zip(size, stride, strict=True)]
    return strides


def total_stride(strides: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """The downsampling factor per axis of all ``strides`` together."""
    return tuple(math.prod(stride[axis] for stride in strides) for axis in range(3))


def isotropic_patch(spacing: Sequence[float], shape: Sequence[int], voxels: float) -> list[float]:
    """Patch size (float voxels per axis) of about ``voxels`` voxels covering equal millimetres per axis,
    clipped to ``shape`` (the median case, in target voxels), the clipped axes' share given to the others."""
    sizes = [0.0, 0.0, 0.0]
    free = [0, 1, 2]
    budget = float(voxels)
    while free:
        # equal extent in mm: size_a = extent / spacing_a, prod(size_a over free axes) = budget
        extent = (budget * math.prod(spacing[a] for a in free)) ** (1 / len(free))
        clipped = [a for a in free if extent / spacing[a] > shape[a]]
        if not clipped:
            for axis in free:
                sizes[axis] = extent / spacing[axis]
            break
        for axis in clipped:
            sizes[axis] = float(shape[axis])
            budget /= shape[axis]
            free.remove(axis)
    return sizes


def patch_topology(spacing: Sequence[float], shape: Sequence[int], voxels: float,
                   max_levels: int = MAX_LEVELS) -> tuple[tuple[int, int, int], list[tuple]]:  # fmt: skip
    """(patch size, strides) for a budget of ``voxels`` patch voxels (at most that many, except that every axis
    keeps at least one voxel, or one multiple of its downsampling).

    The patch is ``isotropic_patch`` rounded down per axis to a multiple of the total downsampling of the
    strides that patch gets (at least one multiple, so a tiny budget still gives a valid network).
    """
    sizes = isotropic_patch(spacing, shape, voxels)
    sizes = [s * (1 + 1e-9) for s in sizes]  # 127.99999 voxels is 128
    strides = level_strides(spacing, [max(1, int(s)) for s in sizes], max_levels)
    factor = total_stride(strides)
    patch = tuple(max(f, int(s) // f * f) for s, f in zip(sizes, factor, strict=True))
    return patch, level_strides(spacing, patch, max_levels)  # powers of two: still divides the patch
