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

Every chunk of a volume is written, also those equal to the fill value (zarr skips them by default):
zarr reads a missing chunk file as the fill value without a word, so only a store known to hold every
chunk lets a ``ChunkCheckedArray`` tell a lost chunk file from air or background and fail instead.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
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
    """Write ``data`` (z, y, x) as array ``name`` of ``group`` with our chunking and codec, every chunk
    stored (also those equal to the fill value, so that a lost chunk file can be told from air)."""
    with codec_pipeline():
        array = group.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunk_shape(data.shape, spacing, options),
            compressors=[blosc_codec(options, data.dtype)],
            fill_value=fill_value,
            dimension_names=["z", "y", "x"],
            config={"write_empty_chunks": True},
        )
    depth = array.chunks[0]
    with zarrs_errors_as_os_errors(local_directory(array)):
        for z in range(0, data.shape[0], depth):  # one chunk-row at a time: a reoriented (strided) view is
            array[z : z + depth] = data[z : z + depth]  # copied a slab at a time, never as a whole
        write_skipped_chunks(array)
    return array


@contextmanager
def zarrs_errors_as_os_errors(path: Path | None) -> Iterator[None]:
    """zarrs reports a failed write as ``RuntimeError("No space left on device (os error 28)")``, without a
    path; turn it into the OSError zarr-python would raise, naming ``path`` (the array being written)."""
    try:
        yield
    except RuntimeError as error:
        match = re.search(r"\(os error (\d+)\)", str(error))
        if match is None:
            raise
        number = int(match.group(1))
        raise OSError(number, os.strerror(number), str(path) if path is not None else None) from error


def write_skipped_chunks(array: zarr.Array) -> None:
    """Store the chunks of ``array`` that have no file yet (zarrs' pipeline skips chunks equal to the fill
    value whatever ``write_empty_chunks`` says) as fill-value chunks, through zarr-python's pipeline. Call
    it after writing all of ``array``; then every chunk file exists and a lost one can be detected."""
    directory = local_directory(array)
    if directory is None:
        return
    missing = [coords for coords in np.ndindex(*chunk_grid_shape(array)) if not _chunk_path(array, directory, coords)]
    if not missing:
        return
    with codec_pipeline(fast=False):
        writer = zarr.open_array(store=array.store, path=array.path, mode="r+").with_config(
            {"write_empty_chunks": True}
        )
    for coords in missing:
        writer[chunk_slices(array, coords)] = array.fill_value


def local_directory(array: zarr.Array) -> Path | None:
    """The directory holding ``array`` when it is stored in a local directory store, else None."""
    root = getattr(array.store, "root", None)
    return Path(root) / array.path if isinstance(root, Path) else None


def chunk_grid_shape(array: zarr.Array) -> tuple[int, ...]:
    """Number of stored chunk files (chunks, or shards when sharded) along each axis."""
    grid = array.metadata.chunk_grid.chunk_shape
    return tuple(-(-extent // size) for extent, size in zip(array.shape, grid, strict=True))


def chunk_slices(array: zarr.Array, coords: Sequence[int]) -> tuple[slice, ...]:
    grid = array.metadata.chunk_grid.chunk_shape
    return tuple(slice(c * n, min((c + 1) * n, d)) for c, n, d in zip(coords, grid, array.shape, strict=True))


def _chunk_path(array: zarr.Array, directory: Path, coords: Sequence[int]) -> str | None:
    """The chunk file of ``coords`` if it exists, else None (its key follows the chunk key encoding)."""
    path = os.path.join(directory, array.metadata.encode_chunk_key(tuple(coords)))
    return path if os.path.isfile(path) else None


class ChunkCheckedArray:
    """A read-only stored (z, y, x) array whose chunks were all written: every read first checks that the
    chunk files it touches exist. zarr reads a missing chunk as the fill value without a word (air or
    background to training and prediction); here it fails naming ``what`` (case and array), the chunk
    and the region. Indexing (``array[z0:z1, y0:y1, x0:x1]``, ``array[...]``), ``shape``, ``chunks``,
    ``dtype`` and ``np.asarray(array)`` behave as on the zarr array.
    """

    def __init__(self, array: zarr.Array, what: str):
        self.array, self.what = array, what
        self.directory = local_directory(array)
        self._grid = tuple(array.metadata.chunk_grid.chunk_shape)
        self._paths: dict[tuple[int, ...], str] = {}  # chunk file of each chunk, once encoded (a few per chunk)

    shape = property(lambda self: self.array.shape)
    chunks = property(lambda self: self.array.chunks)
    dtype = property(lambda self: self.array.dtype)
    ndim = property(lambda self: self.array.ndim)
    fill_value = property(lambda self: self.array.fill_value)

    def __repr__(self) -> str:
        return f"ChunkCheckedArray({self.what}, shape={self.shape}, chunks={self.chunks}, dtype={self.dtype})"

    def __getitem__(self, selection):
        self.check_region(selection_bounds(selection, self.shape))
        return self.array[selection]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self[...], dtype=dtype)

    def check_region(self, bounds: Sequence[tuple[int, int]]) -> None:
        """DataError unless every chunk file overlapping ``[low, high)`` along each axis exists."""
        if self.directory is None or any(high <= low for low, high in bounds):
            return
        ranges = [range(low // n, (high - 1) // n + 1) for (low, high), n in zip(bounds, self._grid, strict=True)]
        for coords in itertools.product(*ranges):
            path = self._paths.get(coords)
            if path is None:
                path = self._paths[coords] = os.path.join(self.directory, self.array.metadata.encode_chunk_key(coords))
            if not os.path.isfile(path):
                region = ", ".join(f"{low}:{high}" for low, high in bounds)
                key = self.array.metadata.encode_chunk_key(coords)
                raise DataError(
                    f"{self.what}: chunk file {key} is missing (reading region [{region}]); the store is damaged "
                    f"and zarr would read it as {self.fill_value} -- restore it or convert the case again"
                )


def selection_bounds(selection, shape: Sequence[int]) -> list[tuple[int, int]]:
    """Per axis, the range ``[low, high)`` of indices a basic selection (integers, slices, ``...``) touches;
    any other selection is taken to touch the whole array (a superset: only a cost, never a false alarm)."""
    items = selection if isinstance(selection, tuple) else (selection,)
    if any(item is Ellipsis for item in items):
        at = next(i for i, item in enumerate(items) if item is Ellipsis)
        fill = (slice(None),) * (len(shape) - len(items) + 1)
        items = items[:at] + fill + items[at + 1 :]
    items = items + (slice(None),) * (len(shape) - len(items))
    if len(items) != len(shape):
        return [(0, extent) for extent in shape]
    bounds = []
    for item, extent in zip(items, shape, strict=True):
        if isinstance(item, (int, np.integer)):
            index = int(item) + extent if item < 0 else int(item)
            bounds.append((index, index + 1))
        elif isinstance(item, slice):
            start, stop, step = item.indices(extent)
            indices = range(start, stop, step)
            ends = (indices[0], indices[-1]) if indices else (0, -1)
            bounds.append((min(ends), max(ends) + 1) if indices else (0, 0))
        else:
            return [(0, extent) for extent in shape]
    return bounds


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


def read_region(
    array: zarr.Array | ChunkCheckedArray, start: Sequence[int], size: Sequence[int], pad_value: float | int
) -> np.ndarray:
    """Read region ``[start, start + size)`` of a (z, y, x) array; voxels outside it are ``pad_value``.

    Only the chunks that intersect the region are read (a ``ChunkCheckedArray`` first checks they exist).
    ``start`` may be negative and the region may extend beyond the volume (patches at the border).
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
