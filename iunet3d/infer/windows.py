"""Where the sliding windows go, and how much each voxel of a window counts (Gaussian importance)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np


def check_overlap(overlap: float, name: str = "overlap") -> float:
    """``overlap`` if it is a fraction of the window in [0, 1); else a ValueError naming ``name``."""
    if not 0 <= overlap < 1:
        raise ValueError(f"{name}: expected 0 <= overlap < 1, got {overlap}")
    return overlap


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Evenly spaced starts along one axis: the first at 0, the last at ``size - patch``, consecutive
    windows overlapping by at least ``overlap`` of the patch (a volume smaller than the patch: one window
    at 0, padded). nnU-Net places its windows the same way."""
    check_overlap(overlap)
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1 - overlap)))
    count = math.ceil((size - patch) / step) + 1
    span = size - patch
    return [round(i * span / (count - 1)) for i in range(count)]


def window_grid(shape: Sequence[int], patch: Sequence[int], overlap: float) -> list[tuple[int, int, int]]:
    """All window starts (z, y, x), in z-major order."""
    axes = [window_starts(size, p, overlap) for size, p in zip(shape, patch, strict=True)]
    return list(itertools.product(*axes))


def gaussian_importance(patch: Sequence[int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """float32 (D, H, W): a Gaussian centred on the patch with sigma = patch * ``sigma_scale`` per axis,
    scaled to a maximum of 1, and never below its smallest positive value, so no voxel's weights sum to 0
    (the border voxels of a volume are covered by a single window's border)."""
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale: expected > 0, got {sigma_scale}")
    profiles = []
    for size in patch:
        centre, sigma = (size - 1) / 2, size * sigma_scale
        profiles.append(np.exp(-0.5 * ((np.arange(size) - centre) / sigma) ** 2))
    weights = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    weights /= weights.max()
    floor = weights[weights > 0].min() if (weights > 0).any() else 1.0
    return np.maximum(weights, floor).astype(np.float32)
