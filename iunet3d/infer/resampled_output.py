"""A prediction made on the target grid returned onto the scan's own voxels.

The class probabilities (softmax of the blended output), not the labels, are resampled: linear
interpolation of probabilities is a convex combination, so they stay in [0, 1] and sum to 1, and the
argmax on the scan grid follows the boundary between the target voxels instead of their staircase.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from iunet3d.data.resampling import resample_region
from iunet3d.infer.accumulator import block_regions
from iunet3d.infer.sliding_window import softmax


def write_resampled_labels(accumulator, labels, probabilities=None, block: Sequence[int] | None = None) -> None:
    """Finalise a prediction accumulated on the target grid (``accumulator.shape``) onto the scan grid.

    For each block of the scan grid (``block`` voxels; default: the chunks of ``labels`` when it has
    them, else the whole volume): the softmax of the blended output over the target region covering it,
    resampled linearly onto that block, its argmax into ``labels`` (D, H, W) uint8 and, if given, the
    probabilities into ``probabilities`` (K, D, H, W). numpy or Zarr arrays; only one block and the
    target region it reads are in memory at a time.
    """
    shape, target = tuple(labels.shape), tuple(accumulator.shape)
    block = tuple(block or getattr(labels, "chunks", None) or shape)

    def read(region: tuple[slice, ...]) -> np.ndarray:
        return softmax(accumulator.blended(region))

    for region in block_regions(shape, block):
        chances = resample_region(read, target, shape, region, order="linear")
        labels[region] = chances.argmax(axis=0).astype(np.uint8)
        if probabilities is not None:
            probabilities[(slice(None), *region)] = chances
