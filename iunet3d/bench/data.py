"""``iunet3d bench data``: training patches per second and peak memory, our PatchStream vs TorchIO's Queue.

The same ``--cases`` CT phantoms (``make_phantom``, case i from ``(seed, i)``) are stored twice under
``--dir``: as our Zarr dataset, written through the ``synth`` conversion path (``run_conversion``), and as
``case_i_image.nii.gz`` (int16) + ``case_i_label.nii.gz`` (uint8) files read back from that dataset with
nibabel, array axes kept in the same (z, y, x) order and a diagonal affine with the spacing. TorchIO thus
sees tensors whose axes, patch size and per-axis transform parameters (rotation about axis 0, low
resolution along axis 0) mean the same axes as ours. Complete data is reused on the next run.

Both sides deliver ``--patches`` random patches of ``--patch`` voxels in batches of ``--batch-size`` with
``--workers`` worker processes, the same HU window (-1000..1000 -> -1..1) and the same augmentation
(``AugmentationConfig()``, built by ``transforms.build_transform``):

- ours: ``PatchStream`` over the Zarr dataset + ``PatchLoader`` (spawn workers). Each patch reads only its
  region plus the augmentation margin, and the transforms run on that patch-sized region. The stream
  centres 33 % of its patches on a labelled voxel (its default); TorchIO's sampler below is uniform.
- TorchIO's standard path, as its documentation prescribes: ``SubjectsDataset`` of the ``.nii.gz`` files
  with ``Compose([normalisation, augmentation])`` as its transform (``normalization_transform``),
  ``Queue(max_length=samples_per_volume *
  max(workers, 1) * 2, samples_per_volume, UniformSampler(patch), num_workers=workers)`` and a
  ``DataLoader(queue, batch_size, num_workers=0)``. Each worker loads a whole volume, decompresses it,
  normalises and augments the whole volume, and the queue cuts ``samples_per_volume`` patches from it.
  ``max_length`` holds the patches of twice as many volumes as there are workers loading in parallel, so
  the workers are not stalled by a full queue, without holding an epoch's worth of patches.

Each side runs in its own fresh Python process (``python -m iunet3d.bench.data --side ...``), TorchIO's first,
so that neither inherits the other's memory or threads; the TorchIO side never imports zarrs (whose
thread pool does not survive TorchIO's forked workers). A side builds its pipeline, consumes exactly
``--patches`` patches, and checks each batch's shapes (image (B, 1, D, H, W), label (B, D, H, W)).
Seconds run from building the pipeline (datasets, loader; imports excluded) to the last patch, so worker
start-up and the first fill of TorchIO's queue count; "steady" excludes the first batch. Peak RSS: the parent
samples the summed ``VmRSS`` of the side's process and all its descendants (workers, their helpers) from
/proc every 20 ms and keeps the maximum. Pages shared between processes (libraries, copy-on-write pages after
a fork) count once per process, as RSS does: each process that imports torch and TorchIO (with SimpleITK)
starts at about 330 MB of RSS, much of it shared library pages, so with the main process and two workers a
side cannot go below about 1 GB however little data it holds. The summed PSS (``smaps_rollup``: a page
shared by n processes counts 1/n in each) is sampled alongside and gives the memory the tree really takes.
The data was just written, so files come from the OS page
cache: this measures decoding, augmentation and loader overhead, not the disk.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used, so that the CLI starts fast
    import torch

SIDES = ("torchio", "ours")  # the order in which they run
POLL_S = 0.02
HU_WINDOW = (-1000.0, 1000.0)
DATASET_DIR = "zarr"
NIFTI_DIR = "nifti"
MANIFEST = "bench-data.json"
VERSIONED = ("torch", "torchio", "zarr", "zarrs", "nibabel", "SimpleITK", "numpy")


@dataclass
class SideResult:
    side: str
    patches: int  #: patches delivered (and shape-checked)
    seconds: float  #: building the pipeline -> last patch
    patches_per_s: float
    first_batch_s: float  #: building the pipeline -> first batch
    steady_patches_per_s: float | None  #: after the first batch (None with a single batch)
    peak_rss_mb: float  #: max over samples of the summed VmRSS of the side's process tree
    peak_pss_mb: float  #: max over samples of the summed Pss: pages shared by n processes count 1/n each
    peak_processes: int  #: processes in the tree (max over samples)
    hwm_sum_mb: float  #: sum of each process's own VmHWM: an upper bound of the tree's peak


def case_name(index: int) -> str:
    return f"case_{index}"


def nifti_paths(directory: Path, index: int) -> tuple[Path, Path]:
    return (directory / NIFTI_DIR / f"{case_name(index)}_image.nii.gz",
            directory / NIFTI_DIR / f"{case_name(index)}_label.nii.gz")  # fmt: skip


def queue_length(args: argparse.Namespace) -> int:
    return args.samples_per_volume * max(args.workers, 1) * 2


# --- the data -------------------------------------------------------------------------------------------------


def _check_manifest(args: argparse.Namespace, directory: Path) -> None:
    """Record the phantom settings in ``directory``; refuse a directory holding data made with others."""
    settings = {"shape": list(args.shape), "spacing": list(args.spacing), "seed": args.seed}
    path = directory / MANIFEST
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != settings:
            raise ValueError(
                f"--dir {directory} holds benchmark data made with {stored}, not {settings}; "
                "use another --dir or the same --shape/--spacing/--seed"
            )
    else:
        path.write_text(json.dumps(settings) + "\n")


def _write_nifti(case_path: str, image_path: str, label_path: str) -> None:
    """Write one stored case as .nii.gz image (int16) and label (uint8), array axes (z, y, x) kept."""
    import nibabel as nib
    import numpy as np

    from iunet3d.data.dataset import CTCase

    case = CTCase(case_path)
    affine = np.diag([*case.spacing, 1.0])
    arrays = (case.read_image((0, 0, 0), case.shape), case.read_label((0, 0, 0), case.shape))
    for array, path in zip(arrays, (Path(image_path), Path(label_path)), strict=True):
        image = nib.Nifti1Image(array, affine)
        image.header.set_xyzt_units("mm")
        partial = path.with_name(path.name.removesuffix(".nii.gz") + ".partial.nii.gz")
        nib.save(image, partial)
        os.replace(partial, path)  # present = complete


def prepare_data(args: argparse.Namespace, directory: Path, progress: bool) -> dict:
    """Write (or reuse) the Zarr dataset and the NIfTI files under ``directory``; what was done."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm import tqdm

    from iunet3d.data.convert import CaseJob, run_conversion
    from iunet3d.data.synth import SYNTH_CLASS_NAMES

    begin = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    _check_manifest(args, directory)
    synthetic = {"shape": list(args.shape), "spacing": list(args.spacing)}
    jobs = [CaseJob(case=case_name(i), synthetic=synthetic | {"seed": [args.seed, i]}) for i in range(args.cases)]
    dataset = directory / DATASET_DIR
    report = run_conversion(jobs, dataset, class_names=list(SYNTH_CLASS_NAMES), workers=min(2, args.cases),
                            progress=progress)  # fmt: skip
    if report.failed:
        raise RuntimeError(f"writing the Zarr dataset failed: {report.failed}")
    (directory / NIFTI_DIR).mkdir(exist_ok=True)
    todo = [i for i in range(args.cases) if not all(p.is_file() for p in nifti_paths(directory, i))]
    if todo:
        context = multiprocessing.get_context("spawn")  # the store's zarrs pool does not survive fork
        bar = tqdm(total=len(todo), unit="case", desc="writing .nii.gz", disable=not progress)
        with ProcessPoolExecutor(max_workers=min(2, len(todo)), mp_context=context) as pool:
            futures = [pool.submit(_write_nifti, str(dataset / case_name(i)), *map(str, nifti_paths(directory, i)))
                       for i in todo]  # fmt: skip
            for future in as_completed(futures):
                future.result()
                bar.update(1)
        bar.close()
    return {"zarr_cases_written": len(report.converted), "nifti_cases_written": len(todo),
            "data_s": round(time.perf_counter() - begin, 1)}  # fmt: skip


# --- one side, in its own process ---------------------------------------------------------------------------


def _augmentation():
    from iunet3d.patches.augmentation import AugmentationConfig

    return AugmentationConfig()


def _normalization():
    from iunet3d.data.normalization import CTNormalization

    return CTNormalization.window(*HU_WINDOW)


def build_ours(args: argparse.Namespace, directory: Path) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches (image, label) of PatchStream + PatchLoader over the Zarr dataset."""
    from iunet3d.patches.patch_loader import PatchLoader
    from iunet3d.patches.patch_stream import PatchStream

    stream = PatchStream(directory / DATASET_DIR, patch_size=tuple(args.patch), seed=args.seed,
                         transform=_augmentation(), normalization=_normalization(), num_patches=args.patches,
                         cases=[case_name(i) for i in range(args.cases)])  # fmt: skip
    loader = PatchLoader(stream, args.batch_size, num_workers=args.workers)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            for batch in loader:
                yield batch["image"], batch["label"]
        finally:
            loader.close()

    return batches()


def build_torchio(args: argparse.Namespace, directory: Path) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches (image, label) of TorchIO's standard path: SubjectsDataset + Queue + DataLoader, epoch after epoch."""
    import torchio as tio
    from torch.utils.data import DataLoader

    from iunet3d.patches.transforms import build_transform, normalization_transform

    subjects = []
    for i in range(args.cases):
        image, label = nifti_paths(directory, i)
        subjects.append(tio.Subject(image=tio.ScalarImage(image), label=tio.LabelMap(label)))
    transform = tio.Compose([normalization_transform(_normalization()), build_transform(_augmentation())])
    dataset = tio.SubjectsDataset(subjects, transform=transform)
    queue = tio.Queue(dataset, max_length=queue_length(args), samples_per_volume=args.samples_per_volume,
                      sampler=tio.UniformSampler(tuple(args.patch)), num_workers=args.workers,
                      shuffle_subjects=True, shuffle_patches=True)  # fmt: skip
    loader = DataLoader(queue, batch_size=args.batch_size, num_workers=0)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            for batch in loader:
                yield batch["image"][tio.DATA], batch["label"][tio.DATA][:, 0]

    return batches()


def consume(batches: Iterator, args: argparse.Namespace, begin: float) -> dict:
    """Take exactly ``args.patches`` patches, checking shapes; times relative to ``begin``."""
    count, first, stamps = 0, 0, []
    for image, label in batches:
        take = min(image.shape[0], args.patches - count)
        image, label = image[:take], label[:take].long()
        if tuple(image.shape) != (take, 1, *args.patch) or tuple(label.shape) != (take, *args.patch):
            raise RuntimeError(f"batch shapes image {tuple(image.shape)}, label {tuple(label.shape)}: expected "
                               f"({take}, 1, {', '.join(map(str, args.patch))}) and ({take}, ...)")  # fmt: skip
        if str(image.dtype) != "torch.float32":
            raise RuntimeError(f"image dtype {image.dtype}, expected float32")
        count += take
        first = first or take
        stamps.append(time.perf_counter() - begin)
        if count >= args.patches:
            break
    batches.close()
    steady = (count - first) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else None
    return {"patches": count, "seconds": stamps[-1] if stamps else math.nan, "first_batch_s": stamps[0] if stamps
            else math.nan, "steady_patches_per_s": steady}  # fmt: skip


def run_side(args: argparse.Namespace) -> dict:
    """Build one side's pipeline, consume the patches; a dict for the parent."""
    import torch

    if args.side == "ours":  # imports before the clock, each side only what it needs
        import iunet3d.patches.patch_loader  # noqa: F401
        import iunet3d.patches.patch_stream  # noqa: F401
    else:
        import torch.utils.data  # noqa: F401
        import torchio  # noqa: F401

        import iunet3d.patches.transforms  # noqa: F401

    torch.manual_seed(args.seed)
    directory = Path(args.dir)
    begin = time.perf_counter()
    batches = (build_ours if args.side == "ours" else build_torchio)(args, directory)
    return consume(batches, args, begin)


# --- the process tree's memory -----------------------------------------------------------------------------


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process visible in /proc."""
    parents = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    text = stat.read()
            except OSError:  # exited meanwhile
                continue
            parents[int(entry.name)] = int(text.rsplit(b")", 1)[1].split()[1])  # the name may hold ") "
    return parents


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    children = defaultdict(list)
    for pid, parent in _parents().items():
        children[parent].append(pid)
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, ()))
    return tree


def pss_kb(pid: int) -> int:
    """Proportional set size of ``pid`` in kB (0 for a process that exited)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in kB; zeros for a process that exited (or a zombie)."""
    values = {"VmRSS": 0, "VmHWM": 0}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key = line.split(":", 1)[0]
                if key in values:
                    values[key] = int(line.split()[1])
    except OSError:
        pass
    return values["VmRSS"], values["VmHWM"]


class TreeMemory:
    """Samples of a process tree's summed RSS: the peak, the most processes, and each process's own peak."""

    def __init__(self, root: int):
        self.root, self.peak_kb, self.peak_pss_kb, self.peak_processes, self.hwm_kb = root, 0, 0, 0, {}

    def sample(self) -> int:
        """Summed VmRSS (kB) of the tree now (also tracks the summed PSS)."""
        total = pss = 0
        tree = process_tree(self.root)
        for pid in tree:
            rss, hwm = memory_kb(pid)
            total += rss
            pss += pss_kb(pid)
            self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), hwm)
        self.peak_kb, self.peak_processes = max(self.peak_kb, total), max(self.peak_processes, len(tree))
        self.peak_pss_kb = max(self.peak_pss_kb, pss)
        return total


def measure_side(args: argparse.Namespace, side: str, directory: Path) -> SideResult:
    """Run ``side`` in a fresh process, sampling its tree's memory until it exits."""
    command = [
        sys.executable, "-m", "iunet3d.bench.data", "--side", side, "--dir", str(directory), "--cases",
        str(args.cases), "--shape", *map(str, args.shape), "--spacing", *map(str, args.spacing), "--patch",
        *map(str, args.patch), "--patches", str(args.patches), "--batch-size", str(args.batch_size), "--workers",
        str(args.workers), "--samples-per-volume", str(args.samples_per_volume), "--seed", str(args.seed),
    ]  # fmt: skip
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        memory = TreeMemory(process.pid)
        while process.poll() is None:
            memory.sample()
            time.sleep(POLL_S)
        out.seek(0)
        err.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("{")]
        if process.returncode != 0 or not lines:
            raise RuntimeError(f"the {side} side failed (exit code {process.returncode}):\n{err.read()[-4000:]}")
    report = json.loads(lines[-1])
    steady = report["steady_patches_per_s"]
    if report["patches"] != args.patches:
        raise RuntimeError(f"the {side} side delivered {report['patches']} patches, not {args.patches}")
    return SideResult(
        side=side,
        patches=report["patches"],
        seconds=round(report["seconds"], 3),
        patches_per_s=round(report["patches"] / report["seconds"], 3),
        first_batch_s=round(report["first_batch_s"], 3),
        steady_patches_per_s=None if steady is None else round(steady, 3),
        peak_rss_mb=round(memory.peak_kb / 1024, 1),
        peak_pss_mb=round(memory.peak_pss_kb / 1024, 1),
        peak_processes=memory.peak_processes,
        hwm_sum_mb=round(sum(memory.hwm_kb.values()) / 1024, 1),
    )


# --- report --------------------------------------------------------------------------------------------------


def describe_augmentation(config) -> str:
    parts = []
    if config.flip_axes:
        parts.append(f"flip axes {list(config.flip_axes)} (p=0.5 each)")
    if config.affine_probability > 0:
        parts.append(f"affine p={config.affine_probability} (rotation +-{list(config.rotation_degrees)} deg about "
                     f"z, y, x; scale {list(config.scale_range)})")  # fmt: skip
    if config.elastic_probability > 0:
        parts.append(f"elastic p={config.elastic_probability}")
    if config.low_resolution_probability > 0 and config.low_resolution_factor[1] > 1:
        parts.append(f"low resolution along axis {config.low_resolution_axis} x{list(config.low_resolution_factor)} "
                     f"p={config.low_resolution_probability}")  # fmt: skip
    for name in ("noise", "gamma", "contrast"):
        if getattr(config, f"{name}_probability") > 0:
            parts.append(f"{name} p={getattr(config, f'{name}_probability')}")
    return ", ".join(parts) or "none"


def ratios(results: dict[str, SideResult]) -> dict:
    ours, torchio = results["ours"], results["torchio"]
    steady = (None if not (ours.steady_patches_per_s and torchio.steady_patches_per_s)
              else round(ours.steady_patches_per_s / torchio.steady_patches_per_s, 3))  # fmt: skip
    return {"speedup": round(ours.patches_per_s / torchio.patches_per_s, 3), "steady_speedup": steady,
            "rss_ratio": round(ours.peak_rss_mb / torchio.peak_rss_mb, 3),
            "pss_ratio": round(ours.peak_pss_mb / torchio.peak_pss_mb, 3)}  # fmt: skip


def format_table(results: dict[str, SideResult], header: str) -> str:
    """Markdown table, one row per side, and a line with ours vs TorchIO."""
    lines = [
        header,
        "",
        "| side | patches | seconds | patches/s | steady patches/s | first batch s | peak RSS MB (process tree) "
        "| peak PSS MB (process tree) | processes |",
        "|---" * 9 + "|",
    ]
    for side in SIDES:
        r = results[side]
        steady = "-" if r.steady_patches_per_s is None else f"{r.steady_patches_per_s:.2f}"
        lines.append(f"| {side} | {r.patches} | {r.seconds:.2f} | {r.patches_per_s:.2f} | {steady} "
                     f"| {r.first_batch_s:.2f} | {r.peak_rss_mb:.0f} | {r.peak_pss_mb:.0f} "
                     f"| {r.peak_processes} |")  # fmt: skip
    ratio = ratios(results)
    steady = "" if ratio["steady_speedup"] is None else f" (steady {ratio['steady_speedup']:.2f}x)"
    lines += ["", f"ours vs TorchIO: {ratio['speedup']:.2f}x the patches/s{steady}, "
                  f"{ratio['rss_ratio']:.3f} of the peak RSS of the process tree "
                  f"({ratio['pss_ratio']:.3f} of its peak PSS)"]  # fmt: skip
    return "\n".join(lines)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def _header(args: argparse.Namespace, versions: dict[str, str]) -> str:
    nbytes = math.prod(args.shape) * 2
    return (
        f"Patch-loading benchmark: {args.cases} CT phantoms {'x'.join(map(str, args.shape))} (z, y, x) int16 "
        f"({nbytes / 1e6:.0f} MB each) + uint8 labels, spacing {tuple(args.spacing)} mm; {args.patches} random "
        f"patches {'x'.join(map(str, args.patch))} per side in batches of {args.batch_size}, workers={args.workers} "
        f"per side, run in turn (torchio first), each in a fresh process\n"
        f"Transforms (both): HU window {HU_WINDOW[0]:.0f}..{HU_WINDOW[1]:.0f} -> -1..1, "
        f"{describe_augmentation(_augmentation())}\n"
        f"ours: Zarr + PatchStream + PatchLoader (spawn workers), transforms on patch-sized regions; torchio: "
        f".nii.gz + SubjectsDataset + Queue(max_length={queue_length(args)}, samples_per_volume="
        f"{args.samples_per_volume}, UniformSampler, num_workers={args.workers}) + DataLoader(num_workers=0), "
        f"transforms on whole volumes\n"
        f"Seconds: building the pipeline -> last patch (worker start-up included); steady: after the first batch. "
        f"Peak RSS: summed VmRSS of the side's process and its descendants, sampled every {1e3 * POLL_S:.0f} ms\n"
        + ", ".join(f"{name} {v}" for name, v in versions.items())
        + f", {os.cpu_count()} CPU cores"
    )


def _validate(args: argparse.Namespace) -> None:
    if args.cases < 1:
        raise ValueError(f"--cases must be >= 1, got {args.cases}")
    if min(args.shape) < 8:
        raise ValueError(f"--shape must be >= 8 along every axis, got {args.shape}")
    if not all(math.isfinite(s) and s > 0 for s in args.spacing):
        raise ValueError(f"--spacing must be positive and finite, got {args.spacing}")
    if min(args.patch) < 1 or any(p > s for p, s in zip(args.patch, args.shape, strict=True)):
        raise ValueError(f"--patch must be >= 1 and fit in --shape {args.shape} along every axis, got {args.patch}")
    for name in ("patches", "batch_size", "samples_per_volume"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.dir is not None and Path(args.dir).exists() and not Path(args.dir).is_dir():
        raise ValueError(f"--dir {args.dir} exists and is not a directory")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``iunet3d bench data``."""
    _validate(args)
    progress = not args.json
    scratch = tempfile.TemporaryDirectory(prefix="iunet3d-bench-data-") if args.dir is None else nullcontext(args.dir)
    with scratch as where:
        directory = Path(where).resolve()
        data = prepare_data(args, directory, progress)
        results = {}
        for side in SIDES:
            if progress:
                print(f"  measuring {side} ...", file=sys.stderr, flush=True)
            results[side] = measure_side(args, side, directory)
            if progress:
                r = results[side]
                print(f"  measured {side:<8} {r.patches} patches in {r.seconds:.1f} s ({r.patches_per_s:.2f}/s), "
                      f"peak RSS {r.peak_rss_mb:.0f} MB", file=sys.stderr, flush=True)  # fmt: skip
    versions = _versions()
    header = _header(args, versions)
    if args.json:
        ours, torchio = results["ours"], results["torchio"]
        report = {
            "patches_per_s_ours": ours.patches_per_s, "patches_per_s_torchio": torchio.patches_per_s,
            "rss_mb_ours": ours.peak_rss_mb, "rss_mb_torchio": torchio.peak_rss_mb,
            "pss_mb_ours": ours.peak_pss_mb, "pss_mb_torchio": torchio.peak_pss_mb,
            "patches_ours": ours.patches, "patches_torchio": torchio.patches,
            "seconds_ours": ours.seconds, "seconds_torchio": torchio.seconds,
            "steady_patches_per_s_ours": ours.steady_patches_per_s,
            "steady_patches_per_s_torchio": torchio.steady_patches_per_s,
            **ratios(results),
            "settings": {"cases": args.cases, "shape": list(args.shape), "spacing": list(args.spacing),
                         "patch": list(args.patch), "patches": args.patches, "batch_size": args.batch_size,
                         "workers": args.workers, "samples_per_volume": args.samples_per_volume,
                         "queue_max_length": queue_length(args), "seed": args.seed,
                         "hu_window": list(HU_WINDOW), "augmentation": _augmentation().to_dict()},
            "sides": {side: asdict(r) for side, r in results.items()},
            "data": data, "versions": versions, "cpu_count": os.cpu_count(), "header": header,
        }  # fmt: skip
        print(json.dumps(report))
    else:
        print(format_table(results, header))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--cases", type=int, default=8, help="number of CT phantoms (default 8)")
    add("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("D", "H", "W"),
        help="phantom z y x (default 300 512 512)")  # fmt: skip
    add("--spacing", type=float, nargs=3, default=[2.5, 0.8, 0.8], metavar=("Z", "Y", "X"),
        help="voxel spacing in mm (default 2.5 0.8 0.8)")  # fmt: skip
    add("--patch", type=int, nargs=3, default=[64, 128, 128], metavar=("D", "H", "W"),
        help="patch z y x (default 64 128 128)")  # fmt: skip
    add("--patches", type=int, default=64, help="patches delivered per side (default 64)")
    add("--batch-size", type=int, default=2, help="patches per batch (default 2)")
    add("--workers", type=int, default=2, help="loader worker processes per side (default 2)")
    add("--samples-per-volume", type=int, default=8, help="TorchIO Queue's patches per loaded volume (default 8)")
    add("--seed", type=int, default=0, help="case i is make_phantom(seed=(seed, i)); seeds the sampling")
    add("--dir", default=None, help="where the data is written, kept and reused (default: a temporary directory)")
    add("--json", action="store_true", help="print one JSON line instead of the table")


def _side_main() -> None:
    parser = argparse.ArgumentParser(description="one side of iunet3d bench data (internal)")
    parser.add_argument("--side", choices=SIDES, required=True)
    add_arguments(parser)
    args = parser.parse_args()
    print(json.dumps(run_side(args)), flush=True)


if __name__ == "__main__":  # objects pickled by the workers must name this module, not __main__
    from iunet3d.bench.data import _side_main as side_main

    side_main()
