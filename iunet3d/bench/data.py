"""``iunet3d bench data``: training patches per second and peak memory of three patch pipelines, side by side.

Sides (``--sides``, comma-separated; default all three, run in this order, each in a fresh process):

- ``torchio``: TorchIO's standard path, as its documentation prescribes: ``SubjectsDataset`` of the
  ``.nii.gz`` files with ``Compose([normalisation, augmentation])`` as its transform
  (``normalization_transform``), ``Queue(max_length=samples_per_volume * max(workers, 1) * 2,
  samples_per_volume, UniformSampler(patch), num_workers=workers)`` and a ``DataLoader(queue, batch_size,
  num_workers=0)``. Each worker loads a whole volume, decompresses it, normalises and augments the whole
  volume, and the queue cuts ``samples_per_volume`` patches from it. ``max_length`` holds the patches of
  twice as many volumes as there are workers loading in parallel, so the workers are not stalled by a
  full queue, without holding an epoch's worth of patches. Patches are in each case's own voxels.
- ``ours`` (native): ``PatchStream(target_spacing="native")`` over the Zarr dataset + ``PatchLoader``
  (spawn workers). Each patch reads only its region plus the augmentation margin, in the case's own
  voxels, and the transforms run on that patch-sized region. The stream centres 33 % of its patches on a
  labelled voxel (its default); TorchIO's sampler is uniform.
- ``resampled``: the same stream, seed and loader with ``target_spacing`` (``--target-spacing``):
  ``--patch`` then counts voxels at the target spacing, and each patch reads the source region it covers
  and interpolates once onto the target grid (``--image-interpolation``, ``--label-interpolation``), an
  affine augmentation folded into that same interpolation. The table's last line gives its per-patch
  time over the native side's (seconds per patch, overall and steady state). The target: at most 1.5x
  with ``--augmentation no-spatial`` (no affine, elastic or low-resolution transform drawn, so the
  interpolation onto the target grid is the only extra spatial work).

The data: ``--cases`` CT phantoms (``make_phantom``, case i from ``(seed, i)``) of one field of view,
``--shape`` voxels at ``--spacing`` mm, with mixed slice thicknesses: case i has z spacing
``T[i % len(T)]`` of ``--slice-thickness T [T ...]`` (default 1.0 2.5 5.0 mm: thin, standard and thick
slices, as CT collections mix them) and ``max(8, round(shape[0] * spacing[0] / t))`` slices; y and x keep
``--shape``/``--spacing``. Mixed spacings make the default run meaningful for every side: ``--target-spacing
auto`` (the default) picks the dataset's target spacing (``data.resampling.auto_target_spacing``:
(1.0, 0.8, 0.8) mm for the default data), and the native sides see patches of different physical size
from different cases, as they would in training without resampling. With uniform data (a single
``--slice-thickness``, e.g. ``--slice-thickness 2.5`` for the single-spacing data of earlier versions)
``auto`` resolves to the cases' own spacing and the resampled side would only read natively: that fails
with a one-line message; pass an explicit ``--target-spacing Z Y X`` or leave the side out of ``--sides``.
The target spacing is resolved once, over the cases of the run, and shown in the header.

The cases are stored under ``--dir`` as our Zarr dataset, written through the ``synth`` conversion path
(``run_conversion``), and (only when the torchio side runs) as ``case_i_image.nii.gz`` (int16) +
``case_i_label.nii.gz`` (uint8) files read back from that dataset with nibabel, array axes kept in the same
(z, y, x) order and a diagonal affine with that case's own spacing. TorchIO thus sees tensors whose axes,
patch size and per-axis transform parameters (rotation about axis 0, low resolution along axis 0) mean the
same axes as ours. Complete data is reused on the next run; ``bench-data.json`` records the settings it was
made with (``--shape``, ``--spacing``, ``--slice-thickness``, ``--seed``) and a directory made with others
is refused.

Every side delivers ``--patches`` random patches of ``--patch`` voxels in batches of ``--batch-size`` with
``--workers`` worker processes, the same HU window (-1000..1000 -> -1..1) and the same augmentation
(``--augmentation``: ``default`` is ``AugmentationConfig()``; ``no-spatial`` is ``AugmentationConfig(
affine_probability=0, elastic_probability=0, low_resolution_probability=0)``, flips and intensity only),
built by ``transforms.build_transform`` for TorchIO.

Each side runs in its own fresh Python process (``python -m iunet3d.bench.data --side ...``), so that none
inherits another's memory or threads; the TorchIO side never imports zarrs (whose thread pool does not
survive TorchIO's forked workers). A side builds its pipeline, consumes exactly ``--patches`` patches, and
checks each batch's shapes (image (B, 1, D, H, W), label (B, D, H, W)). Seconds run from building the
pipeline (datasets, loader; imports excluded) to the last patch, so worker start-up and the first fill of
TorchIO's queue count; "steady" excludes the first batch. Peak RSS: the parent samples the summed ``VmRSS``
of the side's process and all its descendants (workers, their helpers) from /proc every 20 ms and keeps the
maximum. Pages shared between processes (libraries, copy-on-write pages after a fork) count once per
process, as RSS does: each process that imports torch and TorchIO (with SimpleITK) starts at about 330 MB
of RSS, much of it shared library pages, so with the main process and two workers a side cannot go below
about 1 GB however little data it holds. The summed PSS (``smaps_rollup``: a page shared by n processes
counts 1/n in each) is sampled alongside and gives the memory the tree really takes. The data was just
written, so files come from the OS page cache: this measures decoding, resampling, augmentation and loader
overhead, not the disk. Rates on a shared machine are noisy: compare sides of one run, and rerun.
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
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from iunet3d.plan.process_memory import memory_kb, process_tree

if TYPE_CHECKING:  # imported where used, so that the CLI starts fast
    import torch

SIDES = ("torchio", "ours", "resampled")  # the order in which they run
NATIVE_SIDES = ("torchio", "ours")  # patches in each case's own voxels
DEFAULT_SLICE_THICKNESS = (1.0, 2.5, 5.0)  # mm: thin, standard and thick slices
AUGMENTATIONS = ("default", "no-spatial")
IMAGE_INTERPOLATIONS = ("linear", "cubic")  # as PatchStream's (not imported: the CLI starts fast)
LABEL_INTERPOLATIONS = ("nearest", "linear")
RESAMPLING_TARGET = 1.5  # resampled / native per-patch time, with --augmentation no-spatial
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


def case_spacing(args: argparse.Namespace, index: int) -> list[float]:
    """(z, y, x) mm of case ``index``: z from ``--slice-thickness`` in turn, y and x from ``--spacing``."""
    thickness = args.slice_thickness[index % len(args.slice_thickness)]
    return [float(thickness), float(args.spacing[1]), float(args.spacing[2])]


def case_shape(args: argparse.Namespace, index: int) -> list[int]:
    """(z, y, x) voxels of case ``index``: the field of view of ``--shape`` at ``--spacing``, kept."""
    slices = max(8, round(args.shape[0] * args.spacing[0] / case_spacing(args, index)[0]))
    return [int(slices), int(args.shape[1]), int(args.shape[2])]


def parse_sides(text: str) -> tuple[str, ...]:
    """The sides named in ``--sides`` (comma-separated), in the order they run."""
    names = [name.strip() for name in text.split(",")]
    if not all(names) or any(name not in SIDES for name in names) or len(set(names)) != len(names):
        raise ValueError(f"--sides: expected a comma-separated subset of {','.join(SIDES)} without repeats, "
                         f"got {text!r}")  # fmt: skip
    return tuple(side for side in SIDES if side in names)


def parse_target_spacing(values: list[str]) -> str | tuple[float, float, float]:
    """``--target-spacing``: ``auto``, ``native`` or three positive spacings Z Y X in mm."""
    if len(values) == 1 and values[0] in ("auto", "native"):
        return values[0]
    try:
        numbers = tuple(float(v) for v in values)
    except ValueError:
        numbers = ()
    if len(numbers) != 3 or not all(math.isfinite(n) and n > 0 for n in numbers):
        raise ValueError(f"--target-spacing: expected auto, native or three positive spacings Z Y X in mm, "
                         f"got {' '.join(values)!r}")  # fmt: skip
    return numbers


def resolve_target(args: argparse.Namespace) -> tuple[float, float, float] | None:
    """The target spacing of the resampled side over the run's cases; None where it is every case's own."""
    from iunet3d.data.resampling import resolve_target_spacing, same_spacing

    spacings = [case_spacing(args, i) for i in range(args.cases)]
    target = resolve_target_spacing(parse_target_spacing(args.target_spacing), spacings, "--target-spacing")
    if target is None or all(same_spacing(spacing, target) for spacing in spacings):
        return None
    return tuple(float(t) for t in target)


# --- the data -------------------------------------------------------------------------------------------------


def manifest_settings(args: argparse.Namespace) -> dict:
    """What the stored data depends on (case i's shape and spacing follow from these and i)."""
    return {"shape": list(args.shape), "spacing": list(args.spacing), "seed": args.seed,
            "slice_thickness": [float(t) for t in args.slice_thickness]}  # fmt: skip


def _check_manifest(args: argparse.Namespace, directory: Path) -> None:
    """Record the phantom settings in ``directory``; refuse a directory holding data made with others."""
    settings = manifest_settings(args)
    path = directory / MANIFEST
    if path.is_file():
        stored = json.loads(path.read_text())
        if isinstance(stored, dict) and "slice_thickness" not in stored and isinstance(stored.get("spacing"), list):
            stored["slice_thickness"] = [float(stored["spacing"][0])]  # written before --slice-thickness existed
        if stored != settings:
            raise ValueError(
                f"--dir {directory} holds benchmark data made with {stored}, not {settings}; "
                "use another --dir or the same --shape/--spacing/--slice-thickness/--seed"
            )
    else:
        path.write_text(json.dumps(settings) + "\n")


def case_jobs(args: argparse.Namespace) -> list:
    """The conversion jobs of the run's phantoms, each with its own shape and spacing."""
    from iunet3d.data.convert import CaseJob

    return [CaseJob(case=case_name(i), synthetic={"shape": case_shape(args, i), "spacing": case_spacing(args, i),
                                                  "seed": [args.seed, i]})
            for i in range(args.cases)]  # fmt: skip


def _write_nifti(case_path: str, image_path: str, label_path: str) -> None:
    """Write one stored case as .nii.gz image (int16) and label (uint8), array axes (z, y, x) kept, and an affine
    with the case's own spacing."""
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


def prepare_data(args: argparse.Namespace, directory: Path, progress: bool, nifti: bool = True) -> dict:
    """Write (or reuse) the Zarr dataset and (with ``nifti``) the NIfTI files under ``directory``; what was done."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm import tqdm

    from iunet3d.data.convert import run_conversion
    from iunet3d.data.synth import SYNTH_CLASS_NAMES

    begin = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    _check_manifest(args, directory)
    jobs = case_jobs(args)
    dataset = directory / DATASET_DIR
    report = run_conversion(jobs, dataset, class_names=list(SYNTH_CLASS_NAMES), workers=min(2, args.cases),
                            progress=progress)  # fmt: skip
    if report.failed:
        raise RuntimeError(f"writing the Zarr dataset failed: {report.failed}")
    todo = []
    if nifti:
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


def augmentation_config(name: str):
    """``--augmentation``: ``default`` (``AugmentationConfig()``) or ``no-spatial`` (flips and intensity only)."""
    from iunet3d.patches.augmentation import AugmentationConfig

    if name == "no-spatial":
        return AugmentationConfig(affine_probability=0.0, elastic_probability=0.0, low_resolution_probability=0.0)
    return AugmentationConfig()


def _normalization():
    from iunet3d.data.normalization import CTNormalization

    return CTNormalization.window(*HU_WINDOW)


def build_ours(
    args: argparse.Namespace, directory: Path, target_spacing: tuple[float, float, float] | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches (image, label) of PatchStream + PatchLoader over the Zarr dataset, at ``target_spacing`` if given."""
    from iunet3d.patches.patch_loader import PatchLoader
    from iunet3d.patches.patch_stream import PatchStream

    resampling = {"target_spacing": "native"}
    if target_spacing is not None:
        resampling = {"target_spacing": tuple(target_spacing), "image_interpolation": args.image_interpolation,
                      "label_interpolation": args.label_interpolation}  # fmt: skip
    stream = PatchStream(directory / DATASET_DIR, patch_size=tuple(args.patch), seed=args.seed,
                         transform=augmentation_config(args.augmentation), normalization=_normalization(),
                         num_patches=args.patches, cases=[case_name(i) for i in range(args.cases)],
                         **resampling)  # fmt: skip
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
    transform = tio.Compose([normalization_transform(_normalization()),
                             build_transform(augmentation_config(args.augmentation))])  # fmt: skip
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

    if args.side in ("ours", "resampled"):  # imports before the clock, each side only what it needs
        import iunet3d.patches.patch_loader  # noqa: F401
        import iunet3d.patches.patch_stream  # noqa: F401
    else:
        import torch.utils.data  # noqa: F401
        import torchio  # noqa: F401

        import iunet3d.patches.transforms  # noqa: F401

    torch.manual_seed(args.seed)
    directory = Path(args.dir)
    begin = time.perf_counter()
    if args.side == "torchio":
        batches = build_torchio(args, directory)
    elif args.side == "ours":
        batches = build_ours(args, directory)
    else:
        target = parse_target_spacing(args.target_spacing)
        if isinstance(target, str):  # the parent passes the resolved spacing
            raise ValueError(f"--target-spacing: the resampled side needs Z Y X in mm, got {target!r}")
        batches = build_ours(args, directory, target)
    return consume(batches, args, begin)


# --- the process tree's memory -----------------------------------------------------------------------------


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


def side_command(args: argparse.Namespace, side: str, directory: Path,
                 target: tuple[float, float, float] | None) -> list[str]:  # fmt: skip
    """The command line of ``side``'s process (the resolved target spacing passed as numbers)."""
    return [
        sys.executable, "-m", "iunet3d.bench.data", "--side", side, "--dir", str(directory), "--cases",
        str(args.cases), "--shape", *map(str, args.shape), "--spacing", *map(str, args.spacing),
        "--slice-thickness", *map(str, args.slice_thickness), "--patch", *map(str, args.patch), "--patches",
        str(args.patches), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
        "--samples-per-volume", str(args.samples_per_volume), "--seed", str(args.seed), "--augmentation",
        args.augmentation, "--target-spacing", *(map(repr, target) if target is not None else ["native"]),
        "--image-interpolation", args.image_interpolation, "--label-interpolation", args.label_interpolation,
    ]  # fmt: skip


def measure_side(args: argparse.Namespace, side: str, directory: Path,
                 target: tuple[float, float, float] | None = None) -> SideResult:  # fmt: skip
    """Run ``side`` in a fresh process, sampling its tree's memory until it exits."""
    command = side_command(args, side, directory, target)
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


def _steady_ratio(a: SideResult, b: SideResult) -> float | None:
    """a's steady patches/s over b's (None where either has no steady rate)."""
    if not (a.steady_patches_per_s and b.steady_patches_per_s):
        return None
    return round(a.steady_patches_per_s / b.steady_patches_per_s, 3)


def ratios(results: dict[str, SideResult]) -> dict:
    """ours vs TorchIO (where both ran); resampled / native per-patch time (where both ours sides ran)."""
    found = {}
    if "ours" in results and "torchio" in results:
        ours, torchio = results["ours"], results["torchio"]
        found |= {"speedup": round(ours.patches_per_s / torchio.patches_per_s, 3),
                  "steady_speedup": _steady_ratio(ours, torchio),
                  "rss_ratio": round(ours.peak_rss_mb / torchio.peak_rss_mb, 3),
                  "pss_ratio": round(ours.peak_pss_mb / torchio.peak_pss_mb, 3)}  # fmt: skip
    if "ours" in results and "resampled" in results:  # seconds per patch, resampled over native
        native, resampled = results["ours"], results["resampled"]
        found |= {"resampled_time_ratio": round(native.patches_per_s / resampled.patches_per_s, 3),
                  "resampled_steady_time_ratio": _steady_ratio(native, resampled)}  # fmt: skip
    return found


def _resampling_line(results: dict[str, SideResult], ratio: dict, augmentation: str | None) -> str:
    native, resampled = results["ours"], results["resampled"]
    per_patch = resampled.seconds / resampled.patches, native.seconds / native.patches
    line = (f"resampled / native per-patch time: {ratio['resampled_time_ratio']:.2f}x "
            f"({per_patch[0]:.4f} vs {per_patch[1]:.4f} s per patch)")  # fmt: skip
    steady = ratio["resampled_steady_time_ratio"]
    if steady is not None:
        line += (f", steady {steady:.2f}x ({1 / resampled.steady_patches_per_s:.4f} vs "
                 f"{1 / native.steady_patches_per_s:.4f} s per patch)")  # fmt: skip
    worst = max(r for r in (ratio["resampled_time_ratio"], steady) if r is not None)
    if augmentation == "no-spatial":
        verdict = "met" if worst <= RESAMPLING_TARGET else "not met"
        line += f"; target <= {RESAMPLING_TARGET}x: {verdict}"
    else:
        line += f"; the {RESAMPLING_TARGET}x target applies to --augmentation no-spatial"
    return line


def format_table(results: dict[str, SideResult], header: str, augmentation: str | None = None) -> str:
    """Markdown table, one row per side that ran, a line with ours vs TorchIO and one with resampled / native."""
    lines = [
        header,
        "",
        "| side | patches | seconds | patches/s | steady patches/s | first batch s | peak RSS MB (process tree) "
        "| peak PSS MB (process tree) | processes |",
        "|---" * 9 + "|",
    ]
    for side in (side for side in SIDES if side in results):
        r = results[side]
        steady = "-" if r.steady_patches_per_s is None else f"{r.steady_patches_per_s:.2f}"
        lines.append(f"| {side} | {r.patches} | {r.seconds:.2f} | {r.patches_per_s:.2f} | {steady} "
                     f"| {r.first_batch_s:.2f} | {r.peak_rss_mb:.0f} | {r.peak_pss_mb:.0f} "
                     f"| {r.peak_processes} |")  # fmt: skip
    ratio = ratios(results)
    if "speedup" in ratio:
        steady = "" if ratio["steady_speedup"] is None else f" (steady {ratio['steady_speedup']:.2f}x)"
        lines += ["", f"ours vs TorchIO: {ratio['speedup']:.2f}x the patches/s{steady}, "
                      f"{ratio['rss_ratio']:.3f} of the peak RSS of the process tree "
                      f"({ratio['pss_ratio']:.3f} of its peak PSS)"]  # fmt: skip
    if "resampled_time_ratio" in ratio:
        lines += ["", _resampling_line(results, ratio, augmentation)]
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


def _fmt(values) -> str:
    return "x".join(f"{v:g}" for v in values)


def _header(args: argparse.Namespace, versions: dict[str, str], target: tuple[float, float, float] | None) -> str:
    sides = parse_sides(args.sides)
    shapes = [case_shape(args, i) for i in range(args.cases)]
    nbytes = sum(math.prod(shape) * 2 for shape in shapes)
    cycle = args.slice_thickness[: args.cases]
    slices = ", ".join(str(case_shape(args, i)[0]) for i in range(len(cycle)))
    fov = [n * s for n, s in zip(args.shape, args.spacing, strict=True)]
    lines = [
        f"Patch-loading benchmark: {args.cases} CT phantoms, field of view {_fmt(fov)} mm (z, y, x): "
        f"{args.shape[1]}x{args.shape[2]} voxels at {_fmt(args.spacing[1:])} mm, z spacing cycling through "
        f"{', '.join(f'{t:g}' for t in cycle)} mm ({slices} slices); int16 ({nbytes / 1e6:.0f} MB in all) + uint8 "
        f"labels; {args.patches} random patches {'x'.join(map(str, args.patch))} per side in batches of "
        f"{args.batch_size}, workers={args.workers} per side, run in turn ({', '.join(sides)}), each in a fresh "
        "process",
        f"Transforms (all sides): HU window {HU_WINDOW[0]:.0f}..{HU_WINDOW[1]:.0f} -> -1..1, --augmentation "
        f"{args.augmentation}: {describe_augmentation(augmentation_config(args.augmentation))}",
    ]
    if "ours" in sides:
        lines.append("ours: Zarr + PatchStream(target_spacing=native) + PatchLoader (spawn workers), transforms on "
                     "patch-sized regions, patches in each case's own voxels")  # fmt: skip
    if "resampled" in sides:
        lines.append(f"resampled: the same at target spacing {_fmt(target)} mm (--target-spacing "
                     f"{' '.join(args.target_spacing)}), patches of --patch voxels at that spacing, image "
                     f"{args.image_interpolation}, label {args.label_interpolation}, resampling and affine in one "
                     f"interpolation of the region each patch covers")  # fmt: skip
    if "torchio" in sides:
        lines.append(f"torchio: .nii.gz + SubjectsDataset + Queue(max_length={queue_length(args)}, samples_per_volume="
                     f"{args.samples_per_volume}, UniformSampler, num_workers={args.workers}) + "
                     f"DataLoader(num_workers=0), transforms on whole volumes in each case's own voxels")  # fmt: skip
    lines += [
        f"Seconds: building the pipeline -> last patch (worker start-up included); steady: after the first batch. "
        f"Peak RSS: summed VmRSS of the side's process and its descendants, sampled every {1e3 * POLL_S:.0f} ms",
        ", ".join(f"{name} {v}" for name, v in versions.items()) + f", {os.cpu_count()} CPU cores",
    ]
    return "\n".join(lines)


def _validate(args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[float, float, float] | None]:
    """Check the options before any work; the sides to run and the resampled side's target spacing."""
    sides = parse_sides(args.sides)
    if args.cases < 1:
        raise ValueError(f"--cases must be >= 1, got {args.cases}")
    if min(args.shape) < 8:
        raise ValueError(f"--shape must be >= 8 along every axis, got {args.shape}")
    if not all(math.isfinite(s) and s > 0 for s in args.spacing):
        raise ValueError(f"--spacing must be positive and finite, got {args.spacing}")
    if not all(math.isfinite(t) and t > 0 for t in args.slice_thickness):
        raise ValueError(f"--slice-thickness must be positive and finite (mm), got {args.slice_thickness}")
    smallest = [min(case_shape(args, i)[axis] for i in range(args.cases)) for axis in range(3)]
    if min(args.patch) < 1 or any(p > s for p, s in zip(args.patch, smallest, strict=True)):
        raise ValueError(f"--patch must be >= 1 and fit in every case along every axis (the smallest extents are "
                         f"{smallest} with --shape {args.shape}, --slice-thickness {args.slice_thickness}), "
                         f"got {args.patch}")  # fmt: skip
    for name in ("patches", "batch_size", "samples_per_volume"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.dir is not None and Path(args.dir).exists() and not Path(args.dir).is_dir():
        raise ValueError(f"--dir {args.dir} exists and is not a directory")
    target = resolve_target(args)  # also checks --target-spacing
    if "resampled" in sides and target is None:
        option = " ".join(args.target_spacing)
        if option == "native":
            what = "--target-spacing native reads each case's own voxels"
        else:
            spacings = sorted({_fmt(case_spacing(args, i)) for i in range(args.cases)})
            what = (
                f"--target-spacing {option} resolves to the spacing every case already has ({', '.join(spacings)} mm)"
            )
        raise ValueError(
            f"{what}: the resampled side would not resample; pass --slice-thickness with several values (e.g. "
            f"{' '.join(map(str, DEFAULT_SLICE_THICKNESS))}) or an explicit --target-spacing Z Y X, or leave "
            "resampled out of --sides"
        )
    return sides, target


def run(args: argparse.Namespace) -> int:
    """Entry point of ``iunet3d bench data``."""
    sides, target = _validate(args)
    progress = not args.json
    scratch = tempfile.TemporaryDirectory(prefix="iunet3d-bench-data-") if args.dir is None else nullcontext(args.dir)
    with scratch as where:
        directory = Path(where).resolve()
        data = prepare_data(args, directory, progress, nifti="torchio" in sides)
        results = {}
        for side in sides:
            if progress:
                print(f"  measuring {side} ...", file=sys.stderr, flush=True)
            results[side] = measure_side(args, side, directory, target if side == "resampled" else None)
            if progress:
                r = results[side]
                print(f"  measured {side:<9} {r.patches} patches in {r.seconds:.1f} s ({r.patches_per_s:.2f}/s), "
                      f"peak RSS {r.peak_rss_mb:.0f} MB", file=sys.stderr, flush=True)  # fmt: skip
    versions = _versions()
    header = _header(args, versions, target)
    if args.json:
        report = {}
        for key, field in (("patches_per_s", "patches_per_s"), ("rss_mb", "peak_rss_mb"), ("pss_mb", "peak_pss_mb"),
                           ("patches", "patches"), ("seconds", "seconds"),
                           ("steady_patches_per_s", "steady_patches_per_s")):  # fmt: skip
            report |= {f"{key}_{side}": getattr(r, field) for side, r in results.items()}
        report |= {
            **ratios(results),
            "settings": {"sides": list(sides), "cases": args.cases, "shape": list(args.shape),
                         "spacing": list(args.spacing), "slice_thickness": list(args.slice_thickness),
                         "case_spacings": [case_spacing(args, i) for i in range(args.cases)],
                         "case_shapes": [case_shape(args, i) for i in range(args.cases)],
                         "target_spacing_option": list(args.target_spacing),
                         "target_spacing": None if target is None else list(target),
                         "image_interpolation": args.image_interpolation,
                         "label_interpolation": args.label_interpolation,
                         "patch": list(args.patch), "patches": args.patches, "batch_size": args.batch_size,
                         "workers": args.workers, "samples_per_volume": args.samples_per_volume,
                         "queue_max_length": queue_length(args), "seed": args.seed,
                         "hu_window": list(HU_WINDOW), "augmentation_name": args.augmentation,
                         "augmentation": augmentation_config(args.augmentation).to_dict()},
            "sides": {side: asdict(r) for side, r in results.items()},
            "data": data, "versions": versions, "cpu_count": os.cpu_count(), "header": header,
        }  # fmt: skip
        print(json.dumps(report))
    else:
        print(format_table(results, header, args.augmentation))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--sides", default=",".join(SIDES),
        help=f"comma-separated sides to run, among {','.join(SIDES)} (default all, in that order)")  # fmt: skip
    add("--cases", type=int, default=8, help="number of CT phantoms (default 8)")
    add("--shape", type=int, nargs=3, default=[300, 512, 512], metavar=("D", "H", "W"),
        help="z y x voxels at --spacing: the field of view of every phantom (default 300 512 512)")  # fmt: skip
    add("--spacing", type=float, nargs=3, default=[2.5, 0.8, 0.8], metavar=("Z", "Y", "X"),
        help="voxel spacing in mm of --shape; y and x of every phantom (default 2.5 0.8 0.8)")  # fmt: skip
    add("--slice-thickness", type=float, nargs="+", default=list(DEFAULT_SLICE_THICKNESS), metavar="T",
        help="z spacings in mm, case i takes T[i %% len]; its slices keep the field of view "
             f"(default {' '.join(map(str, DEFAULT_SLICE_THICKNESS))}; one value for uniform data)")  # fmt: skip
    add("--patch", type=int, nargs=3, default=[64, 128, 128], metavar=("D", "H", "W"),
        help="patch z y x, voxels (at the target spacing on the resampled side; default 64 128 128)")  # fmt: skip
    add("--patches", type=int, default=64, help="patches delivered per side (default 64)")
    add("--batch-size", type=int, default=2, help="patches per batch (default 2)")
    add("--workers", type=int, default=2, help="loader worker processes per side (default 2)")
    add("--samples-per-volume", type=int, default=8, help="TorchIO Queue's patches per loaded volume (default 8)")
    add("--augmentation", choices=AUGMENTATIONS, default="default",
        help="default: AugmentationConfig(); no-spatial: no affine, elastic or low resolution (flips and "
             "intensity only), the condition of the resampling target (every side)")  # fmt: skip
    add(
        "--target-spacing",
        nargs="+",
        default=["auto"],
        metavar="SPACING",
        help="the resampled side's spacing: auto (from the cases' spacings; the default), or Z Y X in mm",
    )
    add(
        "--image-interpolation",
        choices=IMAGE_INTERPOLATIONS,
        default="linear",
        help="image interpolation of the resampled side (default linear)",
    )
    add(
        "--label-interpolation",
        choices=LABEL_INTERPOLATIONS,
        default="nearest",
        help="label interpolation of the resampled side (default nearest)",
    )
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
