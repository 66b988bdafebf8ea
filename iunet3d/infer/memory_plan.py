"""Where a whole-volume prediction blends its windows: in memory, or streamed through a Zarr accumulator.

The budget covers the buffers prediction allocates, which grow with the volume or the window: the
accumulator, a batch of windows and their outputs, and the block being finalised (blend, argmax, softmax).
``predict_volume`` holds more only where that fits in the limit too: the chunk rows one window covers
(``slab_cache_bytes``) and the input rows of one z position of windows (``input_slab_bytes``).
It does not cover the network's own activations.

When the model runs at a target spacing, the windows run on the resampled grid (``target_shape``): the
accumulator has that shape, each window is interpolated from the source region it covers (read as int16,
normalised to float32), and each block of the scan grid is finalised from the target region it covers
(blend, softmax, linear interpolation back onto the block).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from iunet3d.infer.accumulator import accumulator_bytes

INTERPOLATION_MARGIN = 4  #: extra input voxels per axis that interpolating a region reads (cubic taps, rounding)


@dataclass(frozen=True)
class MemoryPlan:
    streamed: bool
    in_memory_bytes: int  #: what blending in memory needs (whether or not it was chosen)
    needed_bytes: int  #: what the chosen way needs
    chunk: tuple[int, ...] | None  #: the Zarr accumulator's chunks (streamed only)
    block: tuple[int, ...]  #: the regions of the scan grid finalised one at a time
    target_shape: tuple[int, ...] | None = None  #: the resampled grid the windows run on (None: the scan's)

    def describe(self, max_memory: int | None, kind: str | None = None) -> str:
        """One line: the in-memory need, the limit and the way chosen (``kind``: ``accumulator_kind``'s)."""
        limit = "no limit" if max_memory is None else f"limit {max_memory / 2**20:.0f} MB"
        way = "streamed through a Zarr accumulator" if self.streamed else "in memory"
        if kind == "rows":
            way = "only the rows one window covers are held, labels written row by row"
        grid = "" if self.target_shape is None else f" on the resampled grid {'x'.join(map(str, self.target_shape))}"
        return f"{self.in_memory_bytes / 2**20:.0f} MB to predict in memory{grid}, {limit}: {way}"


def plan_memory(
    num_classes: int,
    shape: Sequence[int],
    patch_size: Sequence[int],
    batch_size: int,
    output_chunk: Sequence[int] | None = None,
    probabilities: bool = False,
    max_memory: int | None = None,
    stream: bool | None = None,
    target_shape: Sequence[int] | None = None,
) -> MemoryPlan:
    """In memory when that fits in ``max_memory`` bytes (None: no limit), else streamed through chunks of
    half a window, finalised one ``output_chunk`` (the label array's chunks) at a time when that fits
    too, else one accumulator chunk at a time. ``stream`` True or False forces either way. A limit below
    what streaming needs is refused, naming that minimum.

    ``shape`` (D, H, W) is the scan's grid; ``target_shape``, when given, the resampled grid the windows
    run on (a model with a target spacing): the accumulator and its chunks are on that grid, the blocks
    finalised (and ``output_chunk``) on the scan's.
    """
    shape, patch_size = tuple(shape), tuple(patch_size)
    grid = shape if target_shape is None else tuple(target_shape)
    resampled = target_shape is not None
    output_chunk = tuple(output_chunk or (_on_scan(patch_size, shape, grid)[0], *shape[1:]))
    slab = (min(output_chunk[0], shape[0]), *shape[1:])
    windows = window_bytes(num_classes, patch_size, batch_size)
    if resampled:
        windows += resampled_window_bytes(patch_size, shape, grid, batch_size)

    def finalizing(block: Sequence[int]) -> int:
        if resampled:
            return resampled_finalize_bytes(num_classes, block, shape, grid, probabilities)
        return finalize_bytes(num_classes, block, probabilities)

    in_memory = accumulator_bytes(num_classes, grid) + windows + finalizing(slab)
    target = grid if resampled else None
    if stream is False or (stream is None and (max_memory is None or in_memory <= max_memory)):
        return MemoryPlan(False, in_memory, in_memory, None, slab, target)
    chunk = tuple(max(1, p // 2) for p in patch_size)  # a window covers 2-3 chunks per axis
    touched = math.prod((math.ceil(p / c) + 1) * c for p, c in zip(patch_size, chunk, strict=True))
    adding = windows + 2 * accumulator_bytes(num_classes, [touched])  # the chunks a window touches, read and written
    whole_chunks = adding + finalizing(output_chunk)
    small = _on_scan(chunk, shape, grid)  # the scan voxels of about one accumulator chunk
    block = output_chunk if max_memory is None or whole_chunks <= max_memory else small  # each written once
    needed = adding + finalizing(block)
    if max_memory is not None and needed > max_memory:
        where = f" on the resampled grid {'x'.join(map(str, grid))}" if resampled else ""
        raise ValueError(
            f"max memory {max_memory / 2**20:.1f} MB is below the {needed / 2**20:.1f} MB that streaming needs "
            f"with {patch_size} windows, batch size {batch_size} and {num_classes} classes{where}"
        )
    return MemoryPlan(True, in_memory, needed, chunk, block, target)


def _on_scan(size: Sequence[int], shape: Sequence[int], grid: Sequence[int]) -> tuple[int, ...]:
    """The scan voxels per axis that ``size`` voxels of the (resampled) ``grid`` cover (>= 1 each)."""
    return tuple(max(1, round(s * n / m)) for s, n, m in zip(size, shape, grid, strict=True))


def _covering(size: Sequence[int], shape: Sequence[int], grid: Sequence[int]) -> tuple[int, ...]:
    """The voxels of ``grid`` that interpolating ``size`` voxels of ``shape`` reads, at most, per axis."""
    return tuple(min(m, math.ceil(s * m / n) + INTERPOLATION_MARGIN) for s, n, m in zip(size, shape, grid, strict=True))


def window_bytes(num_classes: int, patch_size: Sequence[int], batch_size: int) -> int:
    """A batch of float32 windows, its outputs and their sum over mirrorings."""
    return 4 * batch_size * math.prod(patch_size) * (1 + 2 * num_classes)


def input_slab_bytes(shape: Sequence[int], patch_size: Sequence[int]) -> int:
    """The input rows a native prediction holds (``SlidingWindowPredictor(read_slabs=True)``): one z position of
    windows (patch depth x the y-x plane, at least the patch) read as int16 and normalised to float32, with
    one float32 temporary of the normalisation."""
    plane = math.prod(max(n, p) for n, p in zip(shape[1:], patch_size[1:], strict=True))
    return (2 + 4 + 4) * patch_size[0] * plane


def finalize_bytes(num_classes: int, block: Sequence[int], probabilities: bool) -> int:
    """Finalising one block: its sums and weights, the blend, int64 argmax, and the softmax if wanted."""
    per_voxel = 4 * (num_classes + 1) + 4 * num_classes + 8 + (12 * num_classes if probabilities else 0)
    return per_voxel * math.prod(block)


def resampled_window_bytes(patch_size: Sequence[int], shape: Sequence[int], grid: Sequence[int],
                           batch_size: int) -> int:  # fmt: skip
    """Reading a batch of windows of the resampled ``grid`` from a scan of ``shape``: each window's
    source region as int16 and normalised float32, and the interpolation temporaries of one window
    (its input, taps taken, weighted terms and their sum, float32)."""
    source = _covering(patch_size, grid, shape)
    widest = math.prod(max(s, p) for s, p in zip(source, patch_size, strict=True))
    return batch_size * (2 + 4) * math.prod(source) + 16 * widest


def resampled_finalize_bytes(num_classes: int, block: Sequence[int], shape: Sequence[int], grid: Sequence[int],
                             probabilities: bool) -> int:  # fmt: skip
    """Finalising one ``block`` of the scan grid (``shape``) from the resampled ``grid``: the target region
    it covers (its sums and weights, the blend, softmax temporaries), the interpolation temporaries (four
    float32 arrays of K channels), and the block's probabilities, int64 argmax, labels and, if wanted,
    the float16 probabilities written."""
    region = _covering(block, shape, grid)
    covered, voxels = math.prod(region), math.prod(block)
    widest = math.prod(max(r, b) for r, b in zip(region, block, strict=True))
    reading = (4 * (num_classes + 1) + 16 * num_classes + 8) * covered
    interpolating = 16 * num_classes * widest
    writing = (4 * num_classes + 8 + 1 + (2 * num_classes if probabilities else 0)) * voxels
    return reading + interpolating + writing
