"""How CT volumes are laid out in Zarr: chunk shape, codec, and padded region reads.

Defaults follow measurements on CT patches (``iunet3d bench read``): blosc with lz4 and byte shuffle decodes int16
CT 10x faster than zarr's default zstd at a similar ratio, and chunks of 32-64 voxels per axis keep
the read amplification of a 64^3-128^3 patch low. Axes at least 1.5x coarser than the finest axis
(z in anisotropic CT) get the smaller ``coarse_chunk`` so a chunk covers a similar physical extent.

With small chunks a 128^3 read touches ~45 chunks, and zarr-python's own codec pipeline spends about
0.4 ms of asyncio bookkeeping per chunk -- more than lz4 needs to decode it. Our arrays are therefore
opened and written with zarrs' Rust codec pipeline (the ``zarrs`` package) when it is installed, which
removes that overhead (``iunet3d bench read`` measures both). zarrs' thread pool does not survive
``fork``: a process that has read through it must start workers with ``spawn``/``forkserver`` (as
``PatchLoader`` does), or open the stores only inside the workers. A process forked after its parent used
zarrs falls back to zarr-python's pipeline here, with a warning, instead of hanging.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from iunet3d.data.errors import DataError

BLOSC_CODECS = ("lz4", "lz4hc", "blosclz", "zstd", "zlib")
SHUFFLES = ("shuffle", "bitshuffle", "noshuffle")
COARSE_AXIS_RATIO = 1.5
ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"


_zarrs_used_by_pid: int | None = None  # the process that first used zarrs; inherited by forked children
_fork_warning_shown = False


def zarrs_available() -> bool:
    return importlib.util.find_spec("zarrs") is not None


def forked_after_zarrs() -> bool:
    """True in a process forked from one that had used zarrs (whose thread pool would hang here)."""
    return _zarrs_used_by_pid is not None and _zarrs_used_by_pid != os.getpid()


@contextmanager
def codec_pipeline(fast: bool = True) -> Iterator[None]:
    """Arrays opened or created inside use zarrs' codec pipeline (if ``fast`` and installed).

    zarr binds the pipeline when an array is opened, so this scopes the choice to our arrays.
    """
    global _zarrs_used_by_pid, _fork_warning_shown
    if fast and zarrs_available() and forked_after_zarrs():
        if not _fork_warning_shown:
            _fork_warning_shown = True
            warnings.warn(
                "iunet3d: this process was forked after its parent read Zarr through zarrs, whose thread pool "
                "does not survive fork; reading through zarr-python instead (about 3x slower). Start DataLoader "
                "workers with multiprocessing_context='spawn' (PatchLoader does).",
                RuntimeWarning,
                stacklevel=3,
            )
        fast = False
    if fast and zarrs_available():
        _zarrs_used_by_pid = _zarrs_used_by_pid or os.getpid()
        with zarr.config.set({"codec_pipeline.path": ZARRS_PIPELINE}):
            yield
    else:
        yield


def open_volume_array(path: Path | str, fast: bool = True) -> zarr.Array:
    """Open a stored (z, y, x) array read-only, through zarrs' pipeline unless ``fast=False``."""
    with codec_pipeline(fast):
        return zarr.open_array(path, mode="r")


@dataclass(frozen=True)
class StorageOptions:
    """Chunking and compression of the image and label arrays of each case."""

    chunk: int = 64  #: voxels per chunk along the finely sampled axes
    coarse_chunk: int = 32  #: voxels per chunk along axes >= 1.5x coarser than the finest
    codec: str = "lz4"  #: blosc compressor
    level: int = 5  #: blosc compression level 0..9
    shuffle: str = "shuffle"  #: byte shuffle helps int16 CT a lot

    def __post_init__(self) -> None:
        for key in ("chunk", "coarse_chunk"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise DataError(f"storage {key}: expected a positive integer, got {value!r}")
        if self.codec not in BLOSC_CODECS:
            raise DataError(f"storage codec: expected one of {', '.join(BLOSC_CODECS)}, got {self.codec!r}")
        if self.shuffle not in SHUFFLES:
            raise DataError(f"storage shuffle: expected one of {', '.join(SHUFFLES)}, got {self.shuffle!r}")
        if not isinstance(self.level, int) or not 0 <= self.level <= 9:
            raise DataError(f"storage level: expected an integer 0..9, got {self.level!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def chunk_shape(shape: Sequence[int], spacing: Sequence[float], options: StorageOptions) -> tuple[int, ...]:
    """Chunk shape for a volume ``shape`` (z, y, x) with voxel ``spacing`` (z, y, x) in mm."""
    finest = min(spacing)
    return tuple(
        min(size, options.coarse_chunk if step >= COARSE_AXIS_RATIO * finest else options.chunk)
        for size, step in zip(shape, spacing, strict=True)
    )


def blosc_codec(options: StorageOptions, dtype: np.dtype) -> BloscCodec:
    return BloscCodec(
        cname=options.codec, clevel=options.level, shuffle=options.shuffle, typesize=np.dtype(dtype).itemsize
    )


def create_volume_array(
    group: zarr.Group,
    name: str,
    data: np.ndarray,
    spacing: Sequence[float],
    options: StorageOptions,
    fill_value: int = 0,
) -> zarr.Array:
    """Write ``data`` (z, y, x) as array ``name`` of ``group`` with our chunking and codec."""
    with codec_pipeline():
        array = group.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunk_shape(data.shape, spacing, options),
            compressors=[blosc_codec(options, data.dtype)],
            fill_value=fill_value,
            dimension_names=["z", "y", "x"],
        )
    depth = array.chunks[0]
    for z in range(0, data.shape[0], depth):  # one chunk-row at a time: a reoriented (strided) view is
        array[z : z + depth] = data[z : z + depth]  # copied a slab at a time, never as a whole
    return array


def region_slices(
    shape: Sequence[int], start: Sequence[int], size: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """The part of region ``[start, start + size)`` inside a volume of ``shape``.

    Returns (slices into the volume, slices into the region), or None when they do not overlap.
    """
    inside, target = [], []
    for extent, first, length in zip(shape, start, size, strict=True):
        low, high = max(first, 0), min(first + length, extent)
        if high <= low:
            return None
        inside.append(slice(low, high))
        target.append(slice(low - first, high - first))
    return tuple(inside), tuple(target)


def _check_pad_value(pad_value: float | int, dtype: np.dtype) -> None:
    """The padding must be exactly representable in the array's voxel type (no silent wrap or rounding)."""
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        value = float(pad_value)
        if not (np.isfinite(value) and value == int(value) and info.min <= value <= info.max):
            raise DataError(
                f"pad_value {pad_value!r}: expected an integer in {info.min}..{info.max} for {dtype} voxels"
            )


def read_region(array: zarr.Array, start: Sequence[int], size: Sequence[int], pad_value: float | int) -> np.ndarray:
    """Read region ``[start, start + size)`` of a (z, y, x) array; voxels outside it are ``pad_value``.

    Only the chunks that intersect the region are read. ``start`` may be negative and the region may
    extend beyond the volume (patches at the border).
    """
    start = tuple(int(s) for s in start)
    size = tuple(int(s) for s in size)
    if len(start) != array.ndim or len(size) != array.ndim:
        raise DataError(f"region start {start} and size {size} must have {array.ndim} entries (z, y, x)")
    if min(size) < 1:
        raise DataError(f"region size must be positive along every axis, got {size}")
    _check_pad_value(pad_value, array.dtype)
    overlap = region_slices(array.shape, start, size)
    if overlap is not None and all(t.stop - t.start == n for t, n in zip(overlap[1], size, strict=True)):
        return np.asarray(array[overlap[0]])  # entirely inside: no padding buffer
    region = np.full(size, pad_value, dtype=array.dtype)
    if overlap is not None:
        region[overlap[1]] = array[overlap[0]]
    return region
