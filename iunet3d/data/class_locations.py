"""Uniform random samples of voxel positions per class, computed slab by slab.

nnU-Net style foreground oversampling needs, for each class, positions of voxels of that class.
Computing them at conversion (up to ``max_per_class`` per class) means the patch sampler never loads a
label volume. Sampling is uniform without replacement over all voxels of a class, in two passes over
z-slabs so memory stays at one slab whatever the volume size.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MAX_LOCATIONS_PER_CLASS = 10_000
SLAB_DEPTH = 32


def _slabs(depth: int) -> list[slice]:
    return [slice(z, min(z + SLAB_DEPTH, depth)) for z in range(0, depth, SLAB_DEPTH)]


def sample_category_positions(
    categories: Callable[[slice], np.ndarray],
    depth: int,
    max_per_category: int,
    rng: np.random.Generator,
) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """Sample voxel positions per nonzero category value.

    Args:
        categories: maps a z-slice to that slab's category values, uint8 (dz, H, W).
        depth: number of z slices.
    Returns:
        ({value: int32 (n, 3) positions (z, y, x), n = min(count, max_per_category)}, {value: count}).
    """
    slabs = _slabs(depth)
    counts = np.stack([np.bincount(categories(s).ravel(), minlength=256) for s in slabs])  # (slabs, 256)
    totals = counts.sum(axis=0)
    chosen = {}
    for value in np.flatnonzero(totals[1:]) + 1:
        total = int(totals[value])
        chosen[int(value)] = np.sort(rng.choice(total, size=min(total, max_per_category), replace=False))
    slab_offsets = np.cumsum(counts, axis=0) - counts  # voxels of each value before each slab
    found: dict[int, list[np.ndarray]] = {value: [] for value in chosen}
    for index, zs in enumerate(slabs):
        slab = None
        for value, ranks in chosen.items():
            low = slab_offsets[index, value]
            local = ranks[(ranks >= low) & (ranks < low + counts[index, value])] - low
            if local.size == 0:
                continue
            if slab is None:
                slab = categories(zs)
            flat = np.flatnonzero(slab == value)[local]
            z, y, x = np.unravel_index(flat, slab.shape)
            found[value].append(np.stack([z + zs.start, y, x], axis=1).astype(np.int32))
    positions = {value: np.concatenate(parts) for value, parts in found.items()}
    return positions, {value: int(totals[value]) for value in chosen}


def sample_class_locations(
    label: np.ndarray, rng: np.random.Generator, max_per_class: int = MAX_LOCATIONS_PER_CLASS
) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """Per class value >= 1 of ``label`` (D, H, W) uint8: sampled positions (n, 3) and voxel counts."""
    return sample_category_positions(lambda zs: label[zs], label.shape[0], max_per_class, rng)


def sample_foreground_intensities(
    image: np.ndarray, foreground: Callable[[slice], np.ndarray], rng: np.random.Generator, count: int
) -> np.ndarray:
    """Intensities of up to ``count`` uniformly sampled foreground voxels of ``image`` (D, H, W).

    ``foreground`` maps a z-slice to a boolean mask of that slab.
    """
    positions, _ = sample_category_positions(lambda zs: foreground(zs).astype(np.uint8), image.shape[0], count, rng)
    if 1 not in positions:
        return np.zeros(0, dtype=image.dtype)
    z, y, x = positions[1].T
    return image[z, y, x]
