"""``iunet3d bench predict``: whole-volume prediction, accumulator in memory vs streamed.

For each ``--sizes`` shape (z, y, x) one CT phantom (``make_phantom``, seed 0, spacing 2.5 x 0.8 x 0.8 mm)
is written once under ``--dir`` as an int16 Zarr array with our chunking and codec (``create_volume_array``),
and ``predict_volume`` segments it twice, reading it window by window from that store:

- memory: ``max_memory=None``: natively predict_volume then holds only the chunk rows one window covers
  and writes each row's labels as soon as the windows have moved past it ("rows"); before, it summed the
  whole volume in numpy arrays of ``accumulator_bytes`` = 4 * (classes + 1) bytes per voxel;
- streaming: ``max_memory=--max-memory`` MB and ``scratch`` under ``--dir``, so (once the volume is too
  large for that limit) only the chunk rows (along z) one window covers are held and each row's labels are
  written as soon as the windows have moved past it ("rows", nothing on disk), when those rows fit in the
  limit; else the sums go through predict_volume's temporary chunked Zarr accumulator on disk ("zarr
  chunks"). ``accumulator`` in the JSON says which, as predict_volume decides (``accumulator_kind``).

In both modes the labels go into a uint8 Zarr array on disk chunked and compressed like our stores
(``out=``), so the only difference is where the accumulator lives. A Zarr accumulator is also observed, not
only assumed: the scratch directory's mtime is set to 0 before the call, and predict_volume's temporary
accumulator directory, created and removed there, moves it (``zarr_used``). A volume whose accumulator
fits in the limit is predicted in memory in both modes, and the table says so.

The network is the demo's: ``SegmentationIUNet(1, classes, channels, architecture=(1, 1, 1, 1),
resampling_stride=[(1, 2, 2), (2, 2, 2), (2, 2, 2)], norm=None)``, randomly initialised after
``torch.manual_seed(0)`` in every process (same weights in both modes), float32 on the CPU with
``--threads`` torch threads, HU window -1000..1000, no mirroring. Every (size, mode, repeat) runs in a fresh
process (``python -m iunet3d.bench.predict --worker ...``) so that no allocator state leaks between cases,
with glibc's default allocator, as ``iunet3d predict`` runs. A worker builds the network and opens the
stores, runs a warm-up prediction with the same arguments on the volume's first (1.5 x patch) voxels
(one-time torch/oneDNN allocations, zarrs' thread pool; in streaming mode that small corner may fit in
the limit and be accumulated in memory: ``warmup_streamed`` in the JSON says), then:

- seconds: wall-clock of the ``predict_volume`` call: reading windows, the network, blending, and
  writing the labels; voxels/s = voxels of the volume / seconds;
- peak +MB: ``VmHWM`` after the call minus ``VmRSS`` just before it, the high-water mark having been reset
  to the current RSS (``/proc/self/clear_refs`` 5), so it is the memory the call itself took. That
  includes the network's activations for one batch (glibc hands those large buffers back to the OS after
  the warm-up, so the call faults them in again), the same in both modes and at every size;
- the labels, read back after the clock: their SHA-256 and class counts. The parent compares the modes'
  labels per size (and reports the fraction of differing voxels if they differ).

With ``--against monai`` a third mode, ``monai``, runs MONAI's ``sliding_window_inference`` (Gaussian
blending, sigma 1/8 of the patch) with the same network, weights, windows and batch size on the same volume,
read whole into memory, in its own fresh worker (``iunet3d.bench.monai_predict``, which also says how its
windows and weights compare with ours); that worker then compares our blended softmax with MONAI's on the
volume's corner (at most 32x128x128): ``max_prob_diff``. The labels of all modes are compared with ours in
memory.

The modes run in turn per size (memory first for even sizes and repeats, streaming first for odd ones),
so that load on a shared machine hits both alike; with ``--repeats`` > 1 the table shows medians. The
stores were just written, so reads come from the OS page cache. MB = 2**20 bytes throughout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from iunet3d.bench.memory import _reset_peak_rss, _rss_mb

MODES = ("memory", "streaming")
MONAI_MODE = "monai"
SPACING = (2.5, 0.8, 0.8)  #: mm (z, y, x) of the phantoms
SEED = 0  #: of the phantoms and of the network's weights
HU_WINDOW = (-1000.0, 1000.0)
ARCHITECTURE = (1, 1, 1, 1)
STRIDES = ((1, 2, 2), (2, 2, 2), (2, 2, 2))
MIN_EDGE = 8  #: make_phantom's smallest shape per axis
MB = 2**20


@dataclass
class RunResult:
    """One (size, mode, repeat), measured in its own process."""

    shape: list[int]
    mode: str
    repeat: int
    seconds: float  #: wall-clock of predict_volume
    voxels_per_s: float
    baseline_rss_mb: float  #: VmRSS just before the call (network built, warmed up)
    peak_rss_mb: float  #: VmHWM after the call
    peak_growth_mb: float  #: peak_rss_mb - baseline_rss_mb
    streamed: bool  #: through a Zarr accumulator on disk (observed: zarr_used)
    warmup_s: float
    warmup_streamed: bool  #: the warm-up (the volume's small corner) went through a Zarr accumulator
    labels_sha256: str
    label_counts: list[int]  #: voxels per class
    accumulator: str = "memory"  #: accumulator_kind: memory, rows, zarr rows or zarr chunks
    cpu_s: float = 0.0  #: user + system CPU seconds of the call (all threads; not the machine's other tenants)
    minor_faults: int = 0  #: minor page faults of the call (pages mapped afresh, e.g. freed memory reused)
    zarr_used: bool = False  #: predict_volume created a Zarr accumulator under the scratch directory
    agreement: dict | None = None  #: monai mode: windows and probabilities compared with ours (monai_predict)


def parse_size(text: str) -> tuple[int, int, int]:
    """``DxHxW`` -> (D, H, W); anything else fails naming ``--sizes``."""
    parts = text.lower().split("x")
    try:
        shape = tuple(int(part) for part in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < MIN_EDGE:
        raise ValueError(
            f"--sizes: expected shapes DxHxW of three integers >= {MIN_EDGE} (e.g. 64x192x192), got {text!r}"
        )
    return shape  # type: ignore[return-value]


def size_name(shape) -> str:
    return "x".join(map(str, shape))


def class_names(classes: int) -> list[str]:
    from iunet3d.data.synth import SYNTH_CLASS_NAMES

    if classes == len(SYNTH_CLASS_NAMES):
        return list(SYNTH_CLASS_NAMES)
    return ["background", *(f"class_{i}" for i in range(1, classes))]


def build_model(args: argparse.Namespace):
    """The benchmark's TrainedModel: the demo's network, random weights after ``torch.manual_seed(0)``."""
    import torch

    from iunet3d.data.normalization import CTNormalization
    from iunet3d.infer.trained_model import TrainedModel
    from iunet3d.models.segmentation import SegmentationIUNet

    torch.manual_seed(SEED)
    network = SegmentationIUNet(1, args.classes, channels=args.channels, architecture=ARCHITECTURE,
                                resampling_stride=[tuple(s) for s in STRIDES], norm=None)  # fmt: skip
    return TrainedModel(network=network.eval(), class_names=class_names(args.classes), in_channels=1,
                        patch_size=tuple(args.patch), normalization=CTNormalization.window(*HU_WINDOW), step=0,
                        source=Path("random-init"))  # fmt: skip


# --- the data ---------------------------------------------------------------------------------------------------


def size_dir(directory: Path, shape) -> Path:
    return directory / size_name(shape)


def write_image(directory: Path, shape) -> None:
    """The phantom of ``shape`` as ``<dir>/<DxHxW>/image.zarr/image`` (our chunking and codec)."""
    import zarr

    from iunet3d.data.storage import StorageOptions, create_volume_array
    from iunet3d.data.synth import make_phantom

    image, _ = make_phantom(shape, SPACING, seed=SEED)
    path = size_dir(directory, shape) / "image.zarr"
    path.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(path), mode="w")
    create_volume_array(group, "image", image, SPACING, StorageOptions())


def create_labels(path: Path, shape):
    """An empty uint8 label array at ``path``, chunked and compressed like our stores."""
    import numpy as np
    import zarr

    from iunet3d.data.storage import StorageOptions, blosc_codec, chunk_shape, codec_pipeline

    options = StorageOptions()
    with codec_pipeline():
        return zarr.create_array(
            store=str(path), shape=tuple(shape), dtype="uint8", chunks=chunk_shape(shape, SPACING, options),
            compressors=[blosc_codec(options, np.dtype("uint8"))], fill_value=0, overwrite=True,
        )  # fmt: skip


class _Corner:
    """The first ``shape`` voxels of a (z, y, x) array, sliced as predict_volume slices its input."""

    def __init__(self, array, shape):
        self.array, self.shape = array, tuple(shape)

    def __getitem__(self, region):
        """``region``: ``...``, or slices of the leading axes inside ``shape``; the others are the corner's."""
        region = () if region is Ellipsis else region if isinstance(region, tuple) else (region,)
        full = (*region, *(slice(None),) * (len(self.shape) - len(region)))
        return self.array[tuple(slice(*s.indices(n)[:2]) for s, n in zip(full, self.shape, strict=True))]


# --- one measurement, in its own process ------------------------------------------------------------------------


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, all its threads: unlike wall-clock time, this does
    not count time the machine gave to other tenants."""
    times = os.times()
    return times.user + times.system


def minor_faults() -> int:
    """Minor page faults of this process so far: each maps a page afresh (zeroed), e.g. when freed memory that
    the C allocator had handed back to the OS is used again."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measured_call(function) -> tuple[float, float, int]:
    """Call ``function()``; (its wall-clock seconds, its CPU seconds, its minor page faults)."""
    begin, cpu_begin, faults_begin = time.perf_counter(), cpu_seconds(), minor_faults()
    function()
    return time.perf_counter() - begin, cpu_seconds() - cpu_begin, minor_faults() - faults_begin


def _predict(model, image, out, args: argparse.Namespace, mode: str, scratch: Path) -> tuple[float, bool, float, int]:
    """(seconds of one predict_volume call, whether it streamed through ``scratch``, its CPU seconds, its
    minor page faults)."""
    from iunet3d.infer.trained_model import predict_volume

    max_memory = None if mode == "memory" else int(args.max_memory * MB)
    os.utime(scratch, ns=(0, 0))  # the temporary accumulator's directory, created and removed there, moves it
    seconds, cpu_s, faults = measured_call(lambda: predict_volume(
        model, image, overlap=args.overlap, mirror=False, batch_size=args.batch_size, max_memory=max_memory,
        scratch=scratch, device="cpu", progress=False, out=out,
        keep_freed_memory=True,  # as ``iunet3d predict`` runs it
    ))  # fmt: skip
    return seconds, scratch.stat().st_mtime_ns != 0, cpu_s, faults


def _accumulator(shape, out, args: argparse.Namespace, mode: str) -> str:
    """The accumulator predict_volume uses for ``shape`` in ``mode`` (as it decides: ``accumulator_kind``)."""
    from iunet3d.infer.memory_plan import plan_memory
    from iunet3d.infer.trained_model import accumulator_kind

    max_memory = None if mode == "memory" else int(args.max_memory * MB)
    plan = plan_memory(args.classes, shape, args.patch, args.batch_size, out.chunks, False, max_memory, None)
    return accumulator_kind(plan, args.classes, shape, args.patch, max_memory)


def measure(args: argparse.Namespace) -> dict:
    """Warm up, then time one prediction of ``args.size`` in ``args.mode``; a dict for the parent."""
    import gc
    import hashlib

    import numpy as np
    import torch

    from iunet3d.data.storage import open_volume_array

    torch.set_num_threads(args.threads)
    shape = parse_size(args.size)
    model = build_model(args)
    where = size_dir(Path(args.dir), shape)
    image = open_volume_array(where / "image.zarr" / "image")
    scratch = where / f"scratch-{args.mode}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    corner = tuple(min(n, p + p // 2) for n, p in zip(shape, args.patch, strict=True))
    warmup_out = create_labels(where / f"warmup-{args.mode}.zarr", corner)
    out = create_labels(where / f"labels-{args.mode}.zarr", shape)
    warmup_s, _, _, _ = _predict(model, _Corner(image, corner), warmup_out, args, args.mode, scratch)
    gc.collect()
    baseline = _rss_mb("VmRSS")
    _reset_peak_rss()
    seconds, zarr_used, cpu_s, faults = _predict(model, image, out, args, args.mode, scratch)
    peak = _rss_mb("VmHWM")
    labels = np.asarray(out[...])
    accumulator = _accumulator(shape, out, args, args.mode)
    if zarr_used != accumulator.startswith("zarr"):
        raise RuntimeError(f"predict_volume {'did' if zarr_used else 'did not'} use a Zarr accumulator, "
                           f"but accumulator_kind says {accumulator!r}")  # fmt: skip
    return {
        "accumulator": accumulator, "zarr_used": zarr_used, "cpu_s": cpu_s, "minor_faults": faults,
        "seconds": seconds, "baseline_rss_mb": baseline, "peak_rss_mb": peak, "streamed": zarr_used,
        "warmup_s": warmup_s, "warmup_streamed": _accumulator(corner, warmup_out, args, args.mode).startswith("zarr"),
        "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
        "label_counts": np.bincount(labels.ravel(), minlength=args.classes).tolist(),
    }  # fmt: skip


def _worker_main() -> None:
    parser = argparse.ArgumentParser(description="one measurement of iunet3d bench predict (internal)")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--mode", choices=(*MODES, MONAI_MODE), required=True)
    parser.add_argument("--size", required=True)
    add_arguments(parser)
    args = parser.parse_args()
    try:
        if args.mode == MONAI_MODE:
            from iunet3d.bench.monai_predict import measure as measure_monai

            report = measure_monai(args)
        else:
            report = measure(args)
    except ValueError as error:  # predict_volume refused the settings (e.g. a limit too small to stream)
        report = {"error": str(error)}
    print(json.dumps(report), flush=True)


# --- the parent -------------------------------------------------------------------------------------------------


def run_worker(args: argparse.Namespace, directory: Path, shape, mode: str, repeat: int) -> RunResult:
    command = [
        sys.executable, "-m", "iunet3d.bench.predict", "--worker", "--mode", mode, "--size", size_name(shape),
        "--dir", str(directory), "--patch", *map(str, args.patch), "--channels", str(args.channels),
        "--classes", str(args.classes), "--batch-size", str(args.batch_size), "--overlap", str(args.overlap),
        "--max-memory", str(args.max_memory), "--threads", str(args.threads),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark worker {size_name(shape)} {mode} failed (exit code {completed.returncode}):\n"
                           f"{completed.stderr[-4000:]}")  # fmt: skip
    report = json.loads(lines[-1])
    if "error" in report:
        raise ValueError(f"--max-memory: prediction of {size_name(shape)} in {mode} mode refused: {report['error']}")
    voxels = math.prod(shape)
    return RunResult(
        shape=list(shape), mode=mode, repeat=repeat, seconds=round(report["seconds"], 4),
        voxels_per_s=round(voxels / report["seconds"], 1), baseline_rss_mb=round(report["baseline_rss_mb"], 2),
        peak_rss_mb=round(report["peak_rss_mb"], 2),
        peak_growth_mb=round(report["peak_rss_mb"] - report["baseline_rss_mb"], 2), streamed=report["streamed"],
        warmup_s=round(report["warmup_s"], 3), warmup_streamed=report["warmup_streamed"],
        labels_sha256=report["labels_sha256"], label_counts=report["label_counts"],
        accumulator=report.get("accumulator", "memory"), zarr_used=report.get("zarr_used", False),
        cpu_s=round(report.get("cpu_s", 0.0), 3), minor_faults=int(report.get("minor_faults", 0)),
        agreement={key: value for key, value in report.items() if key not in _MEASURED} if mode == MONAI_MODE else None,
    )  # fmt: skip


_MEASURED = ("accumulator", "zarr_used", "cpu_s", "minor_faults", "seconds", "baseline_rss_mb", "peak_rss_mb",
             "streamed", "warmup_s", "warmup_streamed", "labels_sha256", "label_counts")  # fmt: skip


def differing_fraction(directory: Path, shape, other: str = "streaming") -> float:
    """Fraction of voxels whose labels differ between the last runs of the memory mode and ``other``."""
    import numpy as np

    from iunet3d.data.storage import open_volume_array

    memory, theirs = (np.asarray(open_volume_array(size_dir(directory, shape) / f"labels-{mode}.zarr")[...])
                      for mode in ("memory", other))  # fmt: skip
    return float(np.mean(memory != theirs))


def summarise(args: argparse.Namespace, directory: Path, shape, runs: list[RunResult]) -> dict:
    """Per size: medians per mode, the speed ratio, and whether the labels agree."""
    from iunet3d.infer.accumulator import accumulator_bytes
    from iunet3d.infer.windows import window_grid

    entry: dict = {"shape": list(shape), "voxels": math.prod(shape),
                   "accumulator_bytes": accumulator_bytes(args.classes, shape),
                   "windows": len(window_grid(shape, args.patch, args.overlap))}  # fmt: skip
    for mode in _modes(args):
        mine = [r for r in runs if r.mode == mode]
        entry[mode] = {
            "seconds": round(statistics.median(r.seconds for r in mine), 4),
            "cpu_s": round(statistics.median(r.cpu_s for r in mine), 3),
            "minor_faults": int(statistics.median(r.minor_faults for r in mine)),
            "voxels_per_s": round(statistics.median(r.voxels_per_s for r in mine), 1),
            "peak_growth_mb": round(statistics.median(r.peak_growth_mb for r in mine), 2),
            "peak_rss_mb": round(statistics.median(r.peak_rss_mb for r in mine), 2),
            "streamed": all(r.streamed for r in mine),
            "accumulator": "/".join(sorted({r.accumulator for r in mine})),
        }
    entry["speed_ratio"] = round(entry["streaming"]["voxels_per_s"] / entry["memory"]["voxels_per_s"], 3)
    hashes = {r.labels_sha256 for r in runs if r.mode in MODES}
    entry["labels_equal"] = len(hashes) == 1
    entry["differing_fraction"] = 0.0 if entry["labels_equal"] else differing_fraction(directory, shape)
    entry["label_counts"] = runs[0].label_counts
    if MONAI_MODE in entry:
        theirs = [r for r in runs if r.mode == MONAI_MODE]
        entry["ours_vs_monai"] = round(entry["memory"]["seconds"] / entry[MONAI_MODE]["seconds"], 3)
        entry["ours_vs_monai_cpu"] = round(entry["memory"]["cpu_s"] / max(entry[MONAI_MODE]["cpu_s"], 1e-9), 3)
        entry["streamed_vs_memory"] = round(entry["streaming"]["seconds"] / entry["memory"]["seconds"], 3)
        entry["monai_labels_differ"] = differing_fraction(directory, shape, MONAI_MODE)
        entry["agreement"] = theirs[-1].agreement
    return entry


def _modes(args: argparse.Namespace) -> tuple[str, ...]:
    return (*MODES, MONAI_MODE) if args.against == "monai" else MODES


def json_line(entry: dict) -> str:
    """One line of JSON per size for ``--json`` without a file: seconds, peaks (+MB) and agreement."""
    line = {"shape": entry["shape"], "seconds_ours": entry["memory"]["seconds"],
            "seconds_ours_streamed": entry["streaming"]["seconds"], "streamed": entry["streaming"]["streamed"],
            "peak_mb_ours": entry["memory"]["peak_growth_mb"],
            "peak_mb_ours_streamed": entry["streaming"]["peak_growth_mb"],
            "accumulator_streamed": entry["streaming"]["accumulator"],
            "labels_equal": entry["labels_equal"]}  # fmt: skip
    if MONAI_MODE in entry:
        line |= {"seconds_monai": entry[MONAI_MODE]["seconds"], "peak_mb_monai": entry[MONAI_MODE]["peak_growth_mb"],
                 "cpu_s_ours": entry["memory"]["cpu_s"], "cpu_s_monai": entry[MONAI_MODE]["cpu_s"],
                 "ours_vs_monai_cpu": entry["ours_vs_monai_cpu"],
                 "minor_faults_ours": entry["memory"]["minor_faults"],
                 "minor_faults_monai": entry[MONAI_MODE]["minor_faults"],
                 "ours_vs_monai": entry["ours_vs_monai"], "streamed_vs_memory": entry["streamed_vs_memory"],
                 "monai_labels_differ": entry["monai_labels_differ"], **entry["agreement"]}  # fmt: skip
    return json.dumps(line)


def format_table(sizes: list[dict], header: str) -> str:
    """A Markdown table: one row per size, memory and streaming side by side."""
    lines = [
        header,
        "",
        "| shape | Mvoxels | windows | in-memory accumulator MB | memory s | memory Mvox/s | memory peak +MB "
        "| streaming s | streaming Mvox/s | streaming peak +MB | streaming/memory speed | labels equal |",
        "|---" * 12 + "|",
    ]
    for entry in sizes:
        memory, streaming = entry["memory"], entry["streaming"]
        equal = "yes" if entry["labels_equal"] else f"no ({entry['differing_fraction']:.2e} of voxels differ)"
        note = " (zarr)" if streaming["streamed"] else f" ({streaming.get('accumulator', 'memory')})"
        lines.append(
            f"| {size_name(entry['shape'])} | {entry['voxels'] / 1e6:.2f} | {entry['windows']} "
            f"| {entry['accumulator_bytes'] / MB:.1f} | {memory['seconds']:.2f} | {memory['voxels_per_s'] / 1e6:.3f} "
            f"| {memory['peak_growth_mb']:.1f} | {streaming['seconds']:.2f}{note} "
            f"| {streaming['voxels_per_s'] / 1e6:.3f} | {streaming['peak_growth_mb']:.1f} "
            f"| {entry['speed_ratio']:.2f}x | {equal} |"
        )
    against = [entry for entry in sizes if MONAI_MODE in entry]
    if against:
        lines += ["", "| shape | ours s | MONAI s | ours/MONAI time | ours/MONAI CPU time | streamed/ours time "
                  "| ours peak +MB | MONAI peak +MB | streamed peak +MB | same windows "
                  "| max prob diff (MONAI's Gaussian) | max prob diff (same weights) | labels differing from MONAI |",
                  "|---" * 13 + "|"]  # fmt: skip
        for entry in against:
            memory, streaming, monai, agreement = (entry["memory"], entry["streaming"], entry[MONAI_MODE],
                                                   entry["agreement"])  # fmt: skip
            lines.append(
                f"| {size_name(entry['shape'])} | {memory['seconds']:.2f} | {monai['seconds']:.2f} "
                f"| {entry['ours_vs_monai']:.3f} | {entry['ours_vs_monai_cpu']:.3f} "
                f"| {entry['streamed_vs_memory']:.3f} "
                f"| {memory['peak_growth_mb']:.1f} "
                f"| {monai['peak_growth_mb']:.1f} | {streaming['peak_growth_mb']:.1f} | "
                f"{'yes' if agreement['same_windows'] else 'no'} | {agreement['max_prob_diff']:.2e} "
                f"| {agreement['max_prob_diff_same_weights']:.2e} | {entry['monai_labels_differ']:.2e} |"
            )
    return "\n".join(lines)


def _header(args: argparse.Namespace) -> str:
    import numpy as np
    import torch
    import zarr

    return (
        f"Whole-volume prediction benchmark: CT phantoms (int16 Zarr, our chunking and codec, spacing "
        f"{SPACING} mm) read window by window; labels written to a uint8 Zarr array in both modes\n"
        f"Network: SegmentationIUNet(1 -> {args.classes} classes, channels {args.channels}, architecture "
        f"{ARCHITECTURE}, strides {list(STRIDES)}, no norm), random weights (seed {SEED}), float32 on CPU, "
        f"{args.threads} torch thread(s); patch {size_name(args.patch)}, overlap {args.overlap}, batch "
        f"{args.batch_size}, no mirroring\n"
        f"memory: max_memory=None (numpy accumulator); streaming: max_memory={args.max_memory:g} MB (Zarr "
        f"accumulator under --dir). Seconds: the predict_volume call, median of {args.repeats} run(s), each "
        f"(size, mode) in a fresh process after a warm-up, modes in alternating order; peak +MB: VmHWM above "
        f"the VmRSS just before the call (the network's activations for a batch included)\n"
        f"torch {torch.__version__}, zarr {zarr.__version__}, numpy {np.__version__}, {os.cpu_count()} CPU cores"
    )


def _validate(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    if not args.sizes:
        raise ValueError("--sizes: expected at least one shape DxHxW")
    sizes = [parse_size(text) for text in args.sizes]
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"--sizes: each shape once, got {args.sizes}")
    if min(args.patch) < 1:
        raise ValueError(f"--patch: expected positive integers, got {args.patch}")
    for name in ("channels", "batch_size", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.classes < 2:
        raise ValueError(f"--classes: expected >= 2 (background and a class), got {args.classes}")
    if not 0 <= args.overlap < 1:
        raise ValueError(f"--overlap: expected 0 <= overlap < 1, got {args.overlap}")
    if not (math.isfinite(args.max_memory) and args.max_memory > 0):
        raise ValueError(f"--max-memory: expected a positive number of MB, got {args.max_memory}")
    if args.against == "monai":
        try:
            import monai  # noqa: F401
        except ImportError:
            raise ValueError("--against monai: MONAI is not installed (pip install 'iunet3d[monai]')") from None
    if args.dir is not None and Path(args.dir).exists() and not Path(args.dir).is_dir():
        raise ValueError(f"--dir: {args.dir} exists and is not a directory")
    try:
        build_model(args)
    except (ValueError, TypeError) as error:
        raise ValueError(f"--channels {args.channels}: the network cannot be built ({error})") from None
    return sizes


def run(args: argparse.Namespace) -> int:
    """Entry point of ``iunet3d bench predict``."""
    sizes = _validate(args)
    temporary = args.dir is None
    scratch = tempfile.TemporaryDirectory(prefix="iunet3d-bench-predict-") if temporary else nullcontext(args.dir)
    runs: list[RunResult] = []
    summary = []
    with scratch as where:
        directory = Path(where).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        for shape in sizes:
            write_image(directory, shape)
        for index, shape in enumerate(sizes):
            mine = []
            for repeat in range(args.repeats):
                for mode in _modes(args) if (index + repeat) % 2 == 0 else _modes(args)[::-1]:
                    result = run_worker(args, directory, shape, mode, repeat)
                    mine.append(result)
                    note = f" ({result.accumulator})"
                    print(f"  measured {size_name(shape):>12} {mode:<9} {result.seconds:7.2f} s "
                          f"{result.voxels_per_s / 1e6:6.3f} Mvox/s peak +{result.peak_growth_mb:6.1f} MB, "
                          f"{result.cpu_s:6.1f} CPU s, {result.minor_faults} minor faults{note}",
                          file=sys.stderr, flush=True)  # fmt: skip
            runs += mine
            summary.append(summarise(args, directory, shape, mine))
    header = _header(args)
    print(format_table(summary, header), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        for entry in summary:
            print(json_line(entry), flush=True)
    elif args.json:
        settings = {key: value for key, value in vars(args).items() if key not in ("handler", "json")}
        report = {"header": header, "settings": settings, "cpu_count": os.cpu_count(), "sizes": summary,
                  "runs": [asdict(r) for r in runs]}  # fmt: skip
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--sizes", nargs="+", default=["32x128x128", "64x192x192", "96x256x256"], metavar="DxHxW",
        help="volume shapes z x y x x (default 32x128x128 64x192x192 96x256x256)")  # fmt: skip
    add("--patch", type=int, nargs=3, default=[16, 64, 64], metavar=("D", "H", "W"),
        help="sliding-window patch z y x (default 16 64 64)")  # fmt: skip
    add("--channels", type=int, default=16, help="network feature channels (default 16)")
    add("--classes", type=int, default=4, help="output classes, background included (default 4)")
    add("--batch-size", type=int, default=2, help="windows per forward pass (default 2)")
    add("--overlap", type=float, default=0.5, help="window overlap, 0 <= overlap < 1 (default 0.5)")
    add("--max-memory", type=float, default=80.0, metavar="MB",
        help="predict_volume's memory limit in streaming mode (default 80: below what 96x256x256 needs in memory, "
             "enough for the slab cache of a 320x320 plane)")  # fmt: skip
    add("--repeats", type=int, default=1, help="runs per size and mode; the table shows medians (default 1)")
    add("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per worker (default: CPU cores)")
    add("--dir", default=None, help="where the stores and scratch go, kept (default: a temporary directory)")
    add("--json", nargs="?", const="-", default=None, metavar="FILE",
        help="also write all raw results to FILE as JSON; without FILE: one JSON line per size on stdout "
             "(seconds_ours, seconds_monai, seconds_ours_streamed, peak_mb_*, max_prob_diff), "
             "the table on stderr")  # fmt: skip
    add("--against", choices=("monai",), default=None,
        help="also run MONAI's sliding_window_inference on the same network and volume "
             "(pip install monai)")  # fmt: skip


if __name__ == "__main__":
    _worker_main()
