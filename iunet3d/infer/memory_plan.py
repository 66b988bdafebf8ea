"""Where a whole-volume prediction blends its windows: in memory, or streamed through a Zarr accumulator.

The budget covers the buffers prediction allocates, which grow with the volume or the window: the
accumulator, a batch of windows and their outputs, and the block being finalised (blend, argmax, softmax).
It does not cover the network's own activations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from iunet3d.infer.accumulator import accumulator_bytes


@dataclass(frozen=True)
class MemoryPlan:
    streamed: bool
    in_memory_bytes: int  #: what blending in memory needs (whether or not it was chosen)
    needed_bytes: int  #: what the chosen way needs
    chunk: tuple[int, ...] | None  #: the Zarr accumulator's chunks (streamed only)
    block: tuple[int, ...]  #: the regions finalised one at a time

    def describe(self, max_memory: int | None) -> str:
        limit = "no limit" if max_memory is None else f"limit {max_memory / 2**20:.0f} MB"
        way = "streamed through a Zarr accumulator" if self.streamed else "in memory"
        return f"{self.in_memory_bytes / 2**20:.0f} MB to predict in memory, {limit}: {way}"


def plan_memory(
    num_classes: int,
    shape: Sequence[int],
    patch_size: Sequence[int],
    batch_size: int,
    output_chunk: Sequence[int] | None = None,
    probabilities: bool = False,
    max_memory: int | None = None,
    stream: bool | None = None,
) -> MemoryPlan:
    """In memory when that fits in ``max_memory`` bytes (None: no limit), else streamed through chunks of
    half a window, finalised one ``output_chunk`` (the label array's chunks) at a time when that fits
    too, else one accumulator chunk at a time. ``stream`` True or False forces either way. A limit below
    what streaming needs is refused, naming that minimum."""
    shape, patch_size = tuple(shape), tuple(patch_size)
    output_chunk = tuple(output_chunk or (patch_size[0], *shape[1:]))
    slab = (min(output_chunk[0], shape[0]), *shape[1:])
    windows = window_bytes(num_classes, patch_size, batch_size)
    in_memory = accumulator_bytes(num_classes, shape) + windows + finalize_bytes(num_classes, slab, probabilities)
    if stream is False or (stream is None and (max_memory is None or in_memory <= max_memory)):
        return MemoryPlan(False, in_memory, in_memory, None, slab)
    chunk = tuple(max(1, p // 2) for p in patch_size)  # a window covers 2-3 chunks per axis
    touched = math.prod((math.ceil(p / c) + 1) * c for p, c in zip(patch_size, chunk, strict=True))
    adding = windows + 2 * accumulator_bytes(num_classes, [touched])  # the chunks a window touches, read and written
    whole_chunks = adding + finalize_bytes(num_classes, output_chunk, probabilities)
    block = output_chunk if max_memory is None or whole_chunks <= max_memory else chunk  # each written once
    needed = adding + finalize_bytes(num_classes, block, probabilities)
    if max_memory is not None and needed > max_memory:
        raise ValueError(
            f"max memory {max_memory / 2**20:.1f} MB is below the {needed / 2**20:.1f} MB that streaming needs "
            f"with {patch_size} windows, batch size {batch_size} and {num_classes} classes"
        )
    return MemoryPlan(True, in_memory, needed, chunk, block)


def window_bytes(num_classes: int, patch_size: Sequence[int], batch_size: int) -> int:
    """A batch of float32 windows, its outputs and their sum over mirrorings."""
    return 4 * batch_size * math.prod(patch_size) * (1 + 2 * num_classes)


def finalize_bytes(num_classes: int, block: Sequence[int], probabilities: bool) -> int:
    """Finalising one block: its sums and weights, the blend, int64 argmax, and the softmax if wanted."""
    per_voxel = 4 * (num_classes + 1) + 4 * num_classes + 8 + (12 * num_classes if probabilities else 0)
    return per_voxel * math.prod(block)
