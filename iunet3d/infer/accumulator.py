"""Weighted sums of overlapping window outputs: in memory, or streamed through a chunked Zarr store.

Both keep ``sum_w(w * output)`` (K, D, H, W) and ``sum_w(w)`` (D, H, W) and hand back the blended
output ``sum / weight`` block by block, so the caller never needs the whole result at once. The Zarr
accumulator holds only the chunks a window touches while it adds it, so its memory does not grow with
the volume; its chunks are aligned to whole blocks, which are finalised one at a time.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import zarr


def accumulator_bytes(num_classes: int, shape: Sequence[int]) -> int:
    """Bytes of an in-memory accumulator: float32 sums of K channels plus float32 weights."""
    return 4 * (num_classes + 1) * math.prod(shape)


class _Accumulator:
    """Blending shared by both: ``sums`` (K, D, H, W) and ``weights`` (D, H, W), numpy or Zarr arrays."""

    num_classes: int
    shape: tuple[int, ...]
    block: tuple[int, ...]

    def add(self, start: Sequence[int], output: np.ndarray, weight: np.ndarray) -> None:
        """output (K, d, h, w) of the window at ``start``, weighted by weight (d, h, w)."""
        region = _region(start, weight.shape)
        channels = (slice(None), *region)
        self.sums[channels] = self.sums[channels] + output * weight
        self.weights[region] = self.weights[region] + weight

    def blocks(self) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
        """(region, blended output (K, *region shape)) for each block of the volume."""
        for region in block_regions(self.shape, self.block):
            yield region, self.blended(region)

    def blended(self, region: Sequence[slice]) -> np.ndarray:
        """The blended output ``sum / weight`` (K, d, h, w) float32 of any ``region`` (z, y, x slices);
        only the chunks it covers are read."""
        region = tuple(region)
        return self.sums[(slice(None), *region)] / self.weights[region]


class MemoryAccumulator(_Accumulator):
    """Sums in two numpy arrays: (K, D, H, W) and (D, H, W), float32."""

    def __init__(self, num_classes: int, shape: Sequence[int], block: Sequence[int] | None = None):
        self.num_classes, self.shape = num_classes, tuple(shape)
        self.sums = np.zeros((num_classes, *self.shape), np.float32)
        self.weights = np.zeros(self.shape, np.float32)
        self.block = tuple(block or self.shape)


class ZarrAccumulator(_Accumulator):
    """Sums in a Zarr store at ``path`` (uncompressed float32 chunks of ``chunk`` voxels, all K channels
    in one chunk); each ``add`` reads and writes only the chunks the window overlaps. ``blocks`` hands
    back regions of ``block`` voxels (default: one chunk), e.g. the chunks of the output array, so
    that each output chunk is written once."""

    def __init__(
        self,
        path: Path | str,
        num_classes: int,
        shape: Sequence[int],
        chunk: Sequence[int],
        block: Sequence[int] | None = None,
    ):
        self.num_classes, self.shape = num_classes, tuple(shape)
        self.block = tuple(block or chunk)
        root = zarr.open_group(str(path), mode="w")
        options = {"dtype": "float32", "compressors": None, "fill_value": 0.0}
        self.sums = root.create_array("sums", shape=(num_classes, *self.shape), chunks=(num_classes, *chunk), **options)
        self.weights = root.create_array("weights", shape=self.shape, chunks=tuple(chunk), **options)


def block_regions(shape: Sequence[int], block: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    """The regions of a grid of ``block``-sized blocks covering ``shape`` (the last ones clipped)."""
    ranges = [range(0, size, step) for size, step in zip(shape, block, strict=True)]
    for start in itertools.product(*ranges):
        yield tuple(slice(s, min(s + b, size)) for s, b, size in zip(start, block, shape, strict=True))


def _region(start: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))
