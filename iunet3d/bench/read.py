"""``iunet3d bench read``: random region reads from a CT-like volume, our Zarr layout vs zarr's defaults.

One synthetic int16 CT volume (``make_phantom``) is written twice: with ``StorageOptions()`` via
``create_volume_array`` (ours) and with ``zarr.create_array`` given only shape and dtype (zarr's automatic
chunk shape and default codec). For each region size, random starts fully inside the volume are drawn once
and used for both layouts; reads alternate (ours, default, ours, ...) so that load on a shared machine hits
both alike, after a few warm-up reads whose first one checks that both layouts return the same voxels.
Each layout is read through zarr's own Python codec pipeline and through zarrs' Rust pipeline (which
iunet3d uses for its arrays), so the table separates what the layout gives from what the reader gives;
"ours" = our layout read as iunet3d reads it (``read_region`` via zarrs), "default" = zarr's defaults read
by plain slicing as zarr reads them out of the box. The stores were just written, so
reads come from the OS page cache: this measures decoding and zarr overhead, not the disk.
Besides wall-clock time, the CPU time of the process (all threads) per read is reported: zarr decodes chunks
on a thread pool, so on an idle machine wall time favours a codec that decodes in parallel, while in a data
loader whose workers keep every core busy the CPU time is what a read costs.
Read amplification = bytes of the chunks a region touches (from the chunk grid) / bytes of the region.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used, so that the CLI starts fast
    import numpy as np
    import zarr

LAYOUTS = ("ours", "default")
# variant: (stored layout, read through zarrs' codec pipeline)
VARIANTS = {"ours": ("ours", True), "ours-python": ("ours", False), "default": ("default", False),
            "default-zarrs": ("default", True)}  # fmt: skip
WARMUP_READS = 3


@dataclass
class LayoutResult:
    layout: str
    chunks: list[int]
    codec: str
    write_s: float
    disk_bytes: int
    compression_ratio: float


@dataclass
class ReadResult:
    variant: str
    size: list[int]
    median_ms: float  #: wall-clock
    cpu_ms: float  #: median CPU time of the process (all threads): what a read costs a busy data loader
    mb_per_s: float
    read_amplification: float


def describe_codecs(array: zarr.Array) -> str:
    """Filters, serializer and compressors of ``array`` as ``name(key=value, ...)`` joined by ``+``."""
    parts = []
    for codec in (*array.filters, array.serializer, *array.compressors):
        spec = codec.to_dict()
        config = ", ".join(f"{k}={v}" for k, v in spec.get("configuration", {}).items() if k != "blocksize")
        parts.append(f"{spec['name']}({config})")
    return " + ".join(parts)


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def read_amplification(start: Sequence[int], size: Sequence[int], chunks: Sequence[int]) -> float:
    """Bytes of the chunks that region ``[start, start + size)`` intersects / bytes of the region."""
    touched = math.prod(((s + n - 1) // c - s // c + 1) * c for s, n, c in zip(start, size, chunks, strict=True))
    return touched / math.prod(size)


def write_layouts(image: np.ndarray, spacing: Sequence[float], directory: Path) -> list[LayoutResult]:
    """Write ``image`` in both layouts under ``directory``; their descriptions."""
    import zarr

    from iunet3d.data.storage import StorageOptions, create_volume_array

    def ours() -> zarr.Array:
        group = zarr.open_group(store=str(directory / "ours.zarr"), mode="w")
        return create_volume_array(group, "image", image, spacing, StorageOptions())

    def default() -> zarr.Array:
        store = str(directory / "default.zarr")
        array = zarr.create_array(store=store, shape=image.shape, dtype="int16", overwrite=True)
        array[...] = image
        return array

    results = []
    for layout, write in zip(LAYOUTS, (ours, default), strict=True):
        begin = time.perf_counter()
        array = write()
        seconds = time.perf_counter() - begin
        size = disk_bytes(directory / f"{layout}.zarr")
        ratio = round(image.nbytes / size, 3)
        results.append(LayoutResult(layout, list(array.chunks), describe_codecs(array), round(seconds, 3), size, ratio))
    return results


def active_variants() -> list[str]:
    """All variants, or just ours and default when zarrs is not installed (ours then reads through zarr)."""
    from iunet3d.data.storage import zarrs_available

    return list(VARIANTS) if zarrs_available() else ["ours", "default"]


def _readers(directory: Path) -> dict[str, tuple[zarr.Array, Callable[[tuple, tuple], np.ndarray]]]:
    """For each variant: its array (opened with or without zarrs' pipeline) and a region reader."""
    from iunet3d.data.storage import open_volume_array, read_region

    readers = {}
    for variant in active_variants():
        layout, fast = VARIANTS[variant]
        array = open_volume_array(directory / f"{layout}.zarr" / ("image" if layout == "ours" else ""), fast=fast)
        if layout == "ours":
            readers[variant] = (array, lambda start, size, array=array: read_region(array, start, size, 0))
        else:
            readers[variant] = (array, lambda start, size, array=array: array[_slices(start, size)])
    return readers


def _slices(start: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))


def random_starts(shape: Sequence[int], size: Sequence[int], count: int, rng: np.random.Generator) -> list[tuple]:
    """``count`` region starts such that ``[start, start + size)`` lies inside ``shape``."""
    return [tuple(int(rng.integers(0, n - s + 1)) for n, s in zip(shape, size, strict=True)) for _ in range(count)]


def measure_size(directory: Path, size: tuple[int, ...], reads: int, rng: np.random.Generator) -> list[ReadResult]:
    """Median time of ``reads`` interleaved random reads of ``size`` per variant, after warm-up reads."""
    import numpy as np

    readers = _readers(directory)
    shape = readers["ours"][0].shape
    starts = random_starts(shape, size, WARMUP_READS + reads, rng)
    first = {variant: read(starts[0], size) for variant, (_, read) in readers.items()}
    for variant, region in first.items():
        if not np.array_equal(region, first["ours"]):
            raise RuntimeError(f"{variant} disagrees with ours on the region at {starts[0]} of size {size}")
    times: dict[str, list[tuple[float, float]]] = {variant: [] for variant in readers}
    for index, start in enumerate(starts[1:], start=1):
        for variant, (_, read) in readers.items():
            begin, cpu = time.perf_counter(), time.process_time()
            read(start, size)
            if index >= WARMUP_READS:
                times[variant].append((time.perf_counter() - begin, time.process_time() - cpu))
    region_bytes = first["ours"].nbytes
    results = []
    for variant, (array, _) in readers.items():
        wall, cpu = (statistics.median(column) for column in zip(*times[variant], strict=True))
        amplification = statistics.mean(read_amplification(s, size, array.chunks) for s in starts[WARMUP_READS:])
        mb_per_s = round(region_bytes / wall / 1e6, 1)
        results.append(
            ReadResult(
                variant, list(size), round(1e3 * wall, 3), round(1e3 * cpu, 3), mb_per_s, round(amplification, 3)
            )
        )
    return results


def speedups(reads: list[ReadResult]) -> list[dict]:
    """Per region size: default median time / each variant's median time, wall-clock and CPU."""
    by_key = {(tuple(r.size), r.variant): r for r in reads}
    result = []
    for size in dict.fromkeys(tuple(r.size) for r in reads):
        default = by_key[size, "default"]
        entry: dict = {"size": list(size)}
        for r in reads:
            if tuple(r.size) == size:
                entry[f"{r.variant}_vs_default"] = round(default.median_ms / r.median_ms, 3)
                entry[f"cpu_{r.variant}_vs_default"] = round(default.cpu_ms / max(r.cpu_ms, 1e-6), 3)
        result.append(entry)
    return result


def format_table(layouts: list[LayoutResult], reads: list[ReadResult], header: str) -> str:
    """Markdown tables: the two layouts, then one row per region size with ours and default side by side."""
    lines = [
        header,
        "",
        "| layout | chunk shape | codec | write s | on disk MB | compression ratio |",
        "|---" * 6 + "|",
    ]
    for r in layouts:
        lines.append(
            f"| {r.layout} | {tuple(r.chunks)} | {r.codec} | {r.write_s:.2f} | {r.disk_bytes / 1e6:.1f} "
            f"| {r.compression_ratio:.2f} |"
        )
    lines += [
        "",
        "| region | variant | layout | reader | ms/read | CPU ms/read | speed-up vs default | CPU speed-up "
        "| MB/s | read amplification |",
        "|---" * 10 + "|",
    ]
    speedup_by_size = {tuple(entry["size"]): entry for entry in speedups(reads)}
    for r in reads:
        layout, fast = VARIANTS[r.variant]
        speedup = speedup_by_size[tuple(r.size)]
        lines.append(
            f"| {'x'.join(map(str, r.size))} | {r.variant} | {layout} | {'zarrs' if fast else 'zarr-python'} "
            f"| {r.median_ms:.2f} | {r.cpu_ms:.2f} | {speedup[f'{r.variant}_vs_default']:.2f}x "
            f"| {speedup[f'cpu_{r.variant}_vs_default']:.2f}x | {r.mb_per_s:.0f} | {r.read_amplification:.2f} |"
        )
    return "\n".join(lines)


def _validate(args: argparse.Namespace) -> None:
    for name in ("shape", "sizes"):
        if min(getattr(args, name)) < 1:
            raise ValueError(f"--{name} must be >= 1 along every axis, got {getattr(args, name)}")
    if min(args.spacing) <= 0:
        raise ValueError(f"--spacing must be positive, got {args.spacing}")
    if args.reads < 1:
        raise ValueError(f"--reads must be >= 1, got {args.reads}")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``iunet3d bench read``."""
    _validate(args)
    import numpy as np
    import zarr

    from iunet3d.data.synth import make_phantom

    image, _ = make_phantom(shape=tuple(args.shape), spacing=tuple(args.spacing), seed=args.seed)
    image = np.ascontiguousarray(image, dtype=np.int16)
    scratch = tempfile.TemporaryDirectory(prefix="iunet3d-bench-read-") if args.dir is None else nullcontext(args.dir)
    with scratch as where:
        directory = Path(where)
        directory.mkdir(parents=True, exist_ok=True)
        layouts = write_layouts(image, args.spacing, directory)
        rng = np.random.default_rng(args.seed)
        reads = []
        for edge in args.sizes:
            reads += measure_size(directory, tuple(min(edge, n) for n in image.shape), args.reads, rng)
    header = (
        f"Zarr region-read benchmark: int16 CT phantom {'x'.join(map(str, image.shape))} (z, y, x), spacing "
        f"{tuple(args.spacing)} mm, {image.nbytes / 1e6:.0f} MB; median of {args.reads} random reads per size "
        f"after {WARMUP_READS} warm-up reads, variants interleaved; zarr {zarr.__version__}, numpy "
        f"{np.__version__}, {os.cpu_count()} CPU cores\n"
        "Reads come from the OS page cache (stores just written): this measures decoding + zarr overhead, not disk."
    )
    if args.json:
        report = {"header": header, "shape": list(image.shape), "spacing": list(args.spacing)}
        report |= {"volume_bytes": image.nbytes, "cpu_count": os.cpu_count(), "zarr_version": zarr.__version__}
        report |= {"layouts": [asdict(r) for r in layouts], "reads": [asdict(r) for r in reads]}
        print(json.dumps(report | {"speedups": speedups(reads)}))
    else:
        print(format_table(layouts, reads, header))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--shape", type=int, nargs=3, default=[320, 512, 512], metavar=("D", "H", "W"),
        help="volume z y x (default 320 512 512)")  # fmt: skip
    add("--spacing", type=float, nargs=3, default=[2.5, 0.8, 0.8], metavar=("Z", "Y", "X"),
        help="voxel spacing in mm (default 2.5 0.8 0.8)")  # fmt: skip
    add("--sizes", type=int, nargs="+", default=[128, 64],
        help="region edge lengths: size^3 clamped to the volume (default 128 64)")  # fmt: skip
    add("--reads", type=int, default=30, help="timed reads per size per layout (default 30)")
    add("--seed", type=int, default=0, help="seed of the phantom and the read positions")
    add("--dir", default=None, help="where to write the two stores, kept (default: a temporary directory)")
    add("--json", action="store_true", help="print one JSON line instead of the table")
