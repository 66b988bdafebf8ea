"""Command-line front ends of the data tools: ``convert``, ``synth``, ``export`` and ``info``."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from iunet3d.data.convert import CaseJob, ConversionReport, default_workers, pair_case_files, run_conversion
from iunet3d.data.errors import DataError
from iunet3d.data.storage import BLOSC_CODECS, StorageOptions


def _add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = StorageOptions()
    group = parser.add_argument_group("storage")
    group.add_argument("--chunk", type=int, default=defaults.chunk, help="chunk edge along fine axes (voxels)")
    group.add_argument(
        "--coarse-chunk", type=int, default=defaults.coarse_chunk, help="chunk edge along axes >= 1.5x coarser"
    )
    group.add_argument("--codec", choices=BLOSC_CODECS, default=defaults.codec, help="blosc compressor")
    group.add_argument("--level", type=int, default=defaults.level, help="compression level 0..9")
    parser.add_argument("--workers", type=int, default=default_workers(), help="cases converted in parallel")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="convert cases that already exist again and replace them (default: skip a case converted from the "
        "same input, refuse one converted from another)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _storage(args: argparse.Namespace) -> StorageOptions:
    return StorageOptions(chunk=args.chunk, coarse_chunk=args.coarse_chunk, codec=args.codec, level=args.level)


def _class_names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [name.strip() for name in text.split(",")]
    if any(not name for name in names):
        raise DataError(f"--classes: expected comma-separated names (background first), got {text!r}")
    return names


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    single = parser.add_argument_group("one case")
    single.add_argument("--image", type=Path, help="image file (.nii/.nii.gz/.nrrd/.mha/.mhd) or DICOM directory")
    single.add_argument("--label", type=Path, help="label file on the same voxel grid")
    single.add_argument("--case", help="case name in the dataset")
    batch = parser.add_argument_group("many cases (paired by file name; nnU-Net's _0000 suffix is dropped)")
    batch.add_argument("--images", type=Path, help="directory of image files / DICOM series directories")
    batch.add_argument("--labels", type=Path, help="directory of label files named like the images")
    parser.add_argument("--out", type=Path, required=True, help="dataset directory (created if absent)")
    parser.add_argument("--classes", help="class names for label values 0, 1, ..., comma-separated")
    _add_storage_arguments(parser)


def run_convert(args: argparse.Namespace) -> int:
    if (args.image is None) == (args.images is None):
        raise DataError("convert: give either --image PATH --case NAME (one case) or --images DIR (many)")
    problems: dict[str, str] = {}
    if args.image is not None:
        if args.labels is not None:
            raise DataError("--labels goes with --images; for one case use --label")
        if not args.case:
            raise DataError("--case: a case name is required with --image")
        for path, what in ((args.image, "image"), (args.label, "label")):
            if path is not None and not path.exists():
                raise DataError(f"{path}: {what} file not found")
        jobs = [CaseJob(case=args.case, image=args.image, label=args.label)]
    else:
        if args.label is not None or args.case is not None:
            raise DataError("--label and --case go with --image; for a directory use --labels")
        jobs, problems = pair_case_files(args.images, args.labels)
    report = run_conversion(
        jobs,
        args.out,
        class_names=_class_names(args.classes),
        options=_storage(args),
        workers=args.workers,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    report.failed.update(problems)
    if args.image is not None and report.failed:
        raise DataError(report.failed[args.case])
    return _print_report(report, args.out)


def _print_report(report: ConversionReport, out: Path) -> int:
    cases = report.dataset.get("cases", [])
    print(
        f"{out}: {len(report.converted)} converted, {len(report.skipped)} already complete, "
        f"{len(report.failed)} failed; the dataset has {len(cases)} cases, "
        f"classes {', '.join(report.dataset.get('class_names', []))}"
    )
    for case, message in sorted(report.failed.items()):
        print(f"  FAILED {case}: {message}", file=sys.stderr)
    return 1 if report.failed else 0


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    from iunet3d.data.synth import DEFAULT_SHAPE, DEFAULT_SPACING

    parser.add_argument("--out", type=Path, required=True, help="dataset directory (created if absent)")
    parser.add_argument("--cases", type=int, required=True, help="number of synthetic cases")
    parser.add_argument("--shape", type=int, nargs=3, default=DEFAULT_SHAPE, metavar=("D", "H", "W"))
    parser.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=DEFAULT_SPACING,
        metavar=("Z", "Y", "X"),
        help="voxel size in mm; with --shape it sets the field of view that every case keeps",
    )
    slices = parser.add_mutually_exclusive_group()
    slices.add_argument(
        "--slice-thickness",
        type=float,
        nargs="+",
        metavar="T",
        help="z spacings in mm for a dataset of mixed spacings: case i takes T[i %% count] (in-plane spacing stays "
        "--spacing's Y X; the number of slices follows from the field of view)",
    )
    slices.add_argument(
        "--spacing-range",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="z spacing of each case drawn uniformly from [LOW, HIGH] mm (from (seed, i): reruns are identical)",
    )
    parser.add_argument("--seed", type=int, default=0, help="case i is generated from (seed, i)")
    _add_storage_arguments(parser)


def _positive_mm(values, what: str, expected: str = "positive numbers in mm") -> list[float]:
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise DataError(f"{what}: expected {expected}, got {' '.join(f'{v:g}' for v in values)}")
    return [float(v) for v in values]


def synth_z_spacings(args: argparse.Namespace) -> list[float]:
    """The z spacing (mm) of each of ``args.cases`` synthetic cases: ``--spacing``'s, one of
    ``--slice-thickness`` in turn, or a uniform draw from ``--spacing-range`` by a generator of (seed, i)
    (a child stream, so it does not share draws with the phantom's own generator of (seed, i))."""
    if args.slice_thickness is not None:
        thickness = _positive_mm(args.slice_thickness, "--slice-thickness")
        return [thickness[i % len(thickness)] for i in range(args.cases)]
    if args.spacing_range is not None:
        low, high = _positive_mm(args.spacing_range, "--spacing-range", "LOW HIGH in mm with 0 < LOW <= HIGH")
        if low > high:
            raise DataError(f"--spacing-range: expected LOW HIGH in mm with 0 < LOW <= HIGH, got {low:g} {high:g}")
        return [
            float(np.random.default_rng(np.random.SeedSequence([args.seed, i], spawn_key=(0,))).uniform(low, high))
            for i in range(args.cases)
        ]
    return [float(args.spacing[0])] * args.cases


def synth_case_options(args: argparse.Namespace) -> list[dict]:
    """``make_phantom`` options of each case: ``--shape`` x ``--spacing`` is the field of view every case keeps,
    so a case of z spacing t has ``max(8, round(D * Z / t))`` slices (the anatomy is built in mm, scaled to it)."""
    (depth, height, width), (z, y, x) = args.shape, args.spacing
    options = []
    for i, t in enumerate(synth_z_spacings(args)):
        options.append(
            {"shape": [max(8, round(depth * z / t)), height, width], "spacing": [t, y, x], "seed": [args.seed, i]}
        )
    return options


def run_synth(args: argparse.Namespace) -> int:
    from iunet3d.data.synth import SYNTH_CLASS_NAMES, make_phantom

    if args.cases < 1:
        raise DataError(f"--cases: expected a positive number, got {args.cases}")
    make_phantom(shape=(8, 8, 8), spacing=args.spacing, seed=0)  # validates --spacing before any work
    if min(args.shape) < 8:
        raise DataError(f"--shape: expected three sizes >= 8, got {args.shape}")
    if args.seed < 0:
        raise DataError(f"--seed: expected a non-negative integer, got {args.seed}")
    jobs = [CaseJob(case=f"synth_{i:03d}", synthetic=options) for i, options in enumerate(synth_case_options(args))]
    report = run_conversion(
        jobs,
        args.out,
        class_names=list(SYNTH_CLASS_NAMES),
        options=_storage(args),
        workers=args.workers,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    return _print_report(report, args.out)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path)
    parser.add_argument("case")
    parser.add_argument("out", type=Path, help="output file: .nii.gz, .nii, .nrrd, .mha or .mhd")
    parser.add_argument(
        "--label", nargs="?", const="segmentation", default=None, help="export this label instead of the image"
    )


def run_export(args: argparse.Namespace) -> int:
    from iunet3d.data.export import export_case

    out = export_case(args.dataset, args.case, args.out, label=args.label)
    print(f"wrote {out}")
    return 0


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", type=Path)


def run_info(args: argparse.Namespace) -> int:
    from iunet3d.data.dataset import open_dataset

    dataset = open_dataset(args.dataset)
    print(f"{dataset.path}: {len(dataset)} cases, classes: {', '.join(dataset.class_names)}")
    statistics = dataset.statistics
    if statistics.get("spacing"):
        print(f"  spacing median (z, y, x) mm: {_millimetres(statistics['spacing']['median'])}")
        _print_target_spacing(statistics["spacing"], [entry["spacing"] for entry in dataset.info.get("cases", [])])
    if statistics.get("foreground_intensity"):
        hu = statistics["foreground_intensity"]
        print(
            f"  foreground HU: mean {hu['mean']:.1f}, std {hu['std']:.1f}, "
            f"0.5-99.5th percentile {hu['percentile_00_5']:.0f}..{hu['percentile_99_5']:.0f}"
        )
    for entry in dataset.info.get("cases", []):
        shape = "x".join(map(str, entry["shape"]))
        spacing = "x".join(f"{s:.3g}" for s in entry["spacing"])
        print(f"  {entry['name']:<24} {shape:>14}  {spacing:>16} mm  labels: {', '.join(entry['labels']) or '-'}")
    return 0


def _print_target_spacing(statistics: dict, spacings: list) -> None:
    """The spacing the target spacing "auto" chooses, whether cases are resampled to it, and the spacing range."""
    from iunet3d.data.resampling import auto_target_spacing, resolve_target_spacing, same_spacing

    target = auto_target_spacing(statistics)
    resampled = bool(spacings) and resolve_target_spacing("auto", spacings) is not None
    note = "cases are resampled to it" if resampled else "every case has it: patches are read natively"
    print(f'  target spacing "auto" (z, y, x) mm: {_millimetres(target)}  ({note})')
    if spacings and not all(same_spacing(spacing, spacings[0]) for spacing in spacings):
        ranges = ", ".join(
            f"{low:.4g}..{high:.4g}" for low, high in zip(statistics["min"], statistics["max"], strict=True)
        )
        print(f"  spacing range (z, y, x) mm: {ranges}")


def _millimetres(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
