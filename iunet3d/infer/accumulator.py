"""Weighted sums of overlapping window outputs: in memory, or streamed through a chunked Zarr store.

Both keep ``sum_w(w * output)`` (K, D, H, W) and ``sum_w(w)`` (D, H, W) and hand back the blended
output ``sum / weight`` block by block, so the caller never needs the whole result at once. The Zarr
accumulator holds only the chunks a window touches while it adds it, so its memory does not grow with
the volume; its chunks are aligned to whole blocks, which are finalised one at a time. With ``slabs`` it
instead keeps the rows of chunks (along z, the slowest axis) that the current window covers in memory
(``slab_cache_bytes``: a few chunk rows across the whole y-x plane, independent of the volume's depth) and
writes each row once, when the windows (z-major) have moved past it. ``RowAccumulator`` holds the same
rows but never writes them: it hands each row, blended, to the caller as soon as it is complete (labels
written row by row, nothing on disk).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import zarr


def accumulator_bytes(num_classes: int, shape: Sequence[int]) -> int:
    """Bytes of an in-memory accumulator: float32 sums of K channels plus float32 weights."""
    return 4 * (num_classes + 1) * math.prod(shape)


def slab_cache_bytes(num_classes: int, shape: Sequence[int], patch: Sequence[int], chunk: Sequence[int]) -> int:
    """Bytes of a ``ZarrAccumulator``'s slab cache: the chunk rows along z one window of ``patch`` can cover,
    each (K + 1, chunk_z, H, W) float32."""
    rows = min(math.ceil(shape[0] / chunk[0]), math.ceil(patch[0] / chunk[0]) + 1)
    return accumulator_bytes(num_classes, (rows * chunk[0], *shape[1:]))


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

    def add(self, start: Sequence[int], output: np.ndarray, weight: np.ndarray) -> None:
        """output (K, d, h, w) of the window at ``start``, weighted by weight (d, h, w), added in place."""
        _add_in_place(self.sums, self.weights, _region(start, weight.shape), output, weight)


class ZarrAccumulator(_Accumulator):
    """Sums in a Zarr store at ``path`` (uncompressed float32 chunks of ``chunk`` voxels, all K channels
    in one chunk); each ``add`` reads and writes only the chunks the window overlaps. ``blocks`` hands
    back regions of ``block`` voxels (default: one chunk), e.g. the chunks of the output array, so
    that each output chunk is written once.

    With ``slabs``, the rows of chunks along z (each (K, chunk_z, H, W) sums and (chunk_z, H, W) weights)
    that the current window covers are held in memory (at most ``slab_cache_bytes``): a window is added
    there, and a row is written to the store once no window still to come (z-major order) covers it, or
    before ``blocks``/``blended`` read it. A window out of z order is still added correctly: its rows are
    read back from the store first.
    """

    def __init__(
        self,
        path: Path | str,
        num_classes: int,
        shape: Sequence[int],
        chunk: Sequence[int],
        block: Sequence[int] | None = None,
        slabs: bool = False,
    ):
        self.num_classes, self.shape, self.chunk = num_classes, tuple(shape), tuple(chunk)
        self.block = tuple(block or chunk)
        self.slabs = slabs
        root = zarr.open_group(str(path), mode="w")
        options = {"dtype": "float32", "compressors": None, "fill_value": 0.0}
        self.sums = root.create_array("sums", shape=(num_classes, *self.shape), chunks=(num_classes, *chunk), **options)
        self.weights = root.create_array("weights", shape=self.shape, chunks=tuple(chunk), **options)
        self._rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}  #: chunk row -> (sums, weights) held
        self._written: set[int] = set()  #: chunk rows in the store

    def add(self, start: Sequence[int], output: np.ndarray, weight: np.ndarray) -> None:
        """output (K, d, h, w) of the window at ``start``, weighted by weight (d, h, w)."""
        if not self.slabs:
            return super().add(start, output, weight)
        pieces = _row_pieces(start, weight.shape, self.chunk[0], self.shape[0])
        covered = {row for row, _, _ in pieces}
        for row in [row for row in self._rows if row not in covered]:
            self._flush(row)
        for row, inside, part in pieces:
            sums, weights = self._row(row)
            _add_in_place(sums, weights, inside, output[:, part], weight[part])
        return None

    def blended(self, region: Sequence[slice]) -> np.ndarray:
        """As ``_Accumulator.blended``, after writing the rows held in memory to the store."""
        self.flush()
        return super().blended(region)

    def flush(self) -> None:
        """Write the chunk rows held in memory to the store (each row once per stay in memory)."""
        for row in list(self._rows):
            self._flush(row)

    def _row(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        if row not in self._rows:
            rows = self._z(row)
            if row in self._written:  # out of z order: continue from what the store holds
                self._rows[row] = (self.sums[(slice(None), rows)], self.weights[rows])
            else:
                depth = rows.stop - rows.start
                self._rows[row] = (np.zeros((self.num_classes, depth, *self.shape[1:]), np.float32),
                                   np.zeros((depth, *self.shape[1:]), np.float32))  # fmt: skip
        return self._rows[row]

    def _flush(self, row: int) -> None:
        sums, weights = self._rows.pop(row)
        rows = self._z(row)
        self.sums[(slice(None), rows)] = sums
        self.weights[rows] = weights
        self._written.add(row)

    def _z(self, row: int) -> slice:
        return _row_span(row, self.chunk[0], self.shape[0])


class RowAccumulator:
    """Sums held only for the rows of chunks along z (each (K, depth, H, W) and (depth, H, W) float32) that
    the windows still to come can cover: windows are added in z-major order, and a row is blended and handed
    to ``finished(region, blended (K, d, H, W))`` as soon as a window starts below it, then freed;
    ``finish`` hands over the rows left. Nothing is written to disk and at most the rows one window covers
    are held (``slab_cache_bytes``), whatever the volume's depth. A window that reaches a row already
    handed over is refused (ValueError): it would be lost.

    Without ``device`` the rows are numpy arrays and ``add`` takes numpy arrays; with a torch ``device``
    they are tensors there, ``add`` takes tensors on it and ``finished`` gets the blended tensor: on an
    accelerator the outputs are weighted, summed and blended without leaving it."""

    def __init__(self, num_classes: int, shape: Sequence[int], depth: int,
                 finished: Callable[[tuple[slice, ...], np.ndarray], None], device=None):  # fmt: skip
        if depth < 1:
            raise ValueError(f"depth: expected a positive number of z slices per row, got {depth}")
        self.num_classes, self.shape, self.depth, self.finished = num_classes, tuple(shape), depth, finished
        self.device = None if device is None else torch.device(device)
        self._rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}  #: row -> (sums, weights) held
        self._next = 0  #: rows before this one have been handed over

    def add(self, start: Sequence[int], output: np.ndarray, weight: np.ndarray) -> None:
        """output (K, d, h, w) of the window at ``start``, weighted by weight (d, h, w)."""
        pieces = _row_pieces(start, weight.shape, self.depth, self.shape[0])
        first = pieces[0][0]
        if first < self._next:
            raise ValueError(f"window at z={start[0]}: its rows were already finished (windows must come in "
                             f"z-major order)")  # fmt: skip
        while self._next < first:
            self._finish(self._next)
        for row, inside, part in pieces:
            if row not in self._rows:
                rows = _row_span(row, self.depth, self.shape[0])
                plane = (rows.stop - rows.start, *self.shape[1:])
                self._rows[row] = (self._zeros((self.num_classes, *plane)), self._zeros(plane))
            sums, weights = self._rows[row]
            _add_in_place(sums, weights, inside, output[:, part], weight[part])

    def _zeros(self, shape: tuple[int, ...]):
        if self.device is None:
            return np.zeros(shape, np.float32)
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def finish(self) -> None:
        """Hand over every row not yet handed over, in z order."""
        while self._next * self.depth < self.shape[0]:
            self._finish(self._next)

    def _finish(self, row: int) -> None:
        rows = _row_span(row, self.depth, self.shape[0])
        sums, weights = self._rows.pop(row, (None, None))
        if sums is None:
            raise ValueError(f"rows z={rows.start}:{rows.stop} were covered by no window")
        sums /= weights  # the blend, in place
        self._next = row + 1
        self.finished((rows, *(slice(0, n) for n in self.shape[1:])), sums)


def block_regions(shape: Sequence[int], block: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    """The regions of a grid of ``block``-sized blocks covering ``shape`` (the last ones clipped)."""
    ranges = [range(0, size, step) for size, step in zip(shape, block, strict=True)]
    for start in itertools.product(*ranges):
        yield tuple(slice(s, min(s + b, size)) for s, b, size in zip(start, block, shape, strict=True))


def _row_span(row: int, depth: int, volume_depth: int) -> slice:
    """The z slices of chunk row ``row`` (rows of ``depth`` slices; the last one clipped to the volume)."""
    return slice(row * depth, min((row + 1) * depth, volume_depth))


def _row_pieces(start: Sequence[int], size: Sequence[int], depth: int,
                volume_depth: int) -> list[tuple[int, tuple[slice, ...], slice]]:  # fmt: skip
    """The parts of the window at ``start`` (z, y, x) of ``size`` in each chunk row it covers: (row, the
    region inside that row, the window's z slices that fall there)."""
    pieces = []
    for row in range(start[0] // depth, (start[0] + size[0] - 1) // depth + 1):
        rows = _row_span(row, depth, volume_depth)
        lo, hi = max(start[0], rows.start), min(start[0] + size[0], rows.stop)
        inside = (slice(lo - rows.start, hi - rows.start), *_region(start[1:], size[1:]))
        pieces.append((row, inside, slice(lo - start[0], hi - start[0])))
    return pieces


def _add_in_place(sums: np.ndarray, weights: np.ndarray, region, output, weight) -> None:
    """``sums[:, region] += output * weight``, ``weights[region] += weight`` without a (K, d, h, w) temporary
    of the sum."""
    target = sums[(slice(None), *region)]
    for channel, values in zip(target, output, strict=True):
        channel += values * weight
    weights[region] += weight


def _region(start: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))
