"""``iunet3d predict``: whole-volume segmentation of a dataset, one of its cases, or an image file."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="a training checkpoint (step-<N>.pt)")
    parser.add_argument(
        "--input", type=Path, required=True,
        help="a dataset, one case directory of it, or a NIfTI/NRRD/MHA file or DICOM directory",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="output dataset (cases with labels/prediction/0)")
    parser.add_argument("--case", action="append", default=None, metavar="NAME", help="only this case (repeatable)")
    parser.add_argument("--overlap", type=float, default=0.5, help="window overlap, 0 <= overlap < 1 (default 0.5)")
    parser.add_argument("--mirror", action="store_true", help="test-time mirroring along all axes (8x slower)")
    parser.add_argument("--batch-size", type=int, default=2, help="windows per forward pass")
    parser.add_argument(
        "--max-memory", type=float, default=None, metavar="MB",
        help="accumulate in memory up to this size, else stream through a temporary Zarr store (default: no limit)",
    )  # fmt: skip
    parser.add_argument("--nifti", type=Path, default=None, metavar="DIR", help="also write <case>.nii.gz predictions")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_predict(args: argparse.Namespace) -> int:
    if not 0 <= args.overlap < 1:
        raise ValueError(f"--overlap: expected 0 <= overlap < 1, got {args.overlap}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    with tempfile.TemporaryDirectory(prefix="iunet3d-input-") as scratch:
        dataset, cases = resolve_input(args.input, args.case, Path(scratch))
        return _predict(args, dataset, cases)


def resolve_input(path: Path, cases: list[str] | None, scratch: Path):
    """(dataset, case names) for a dataset, a case directory of one, or an image file / DICOM directory
    (converted into a temporary dataset under ``scratch``)."""
    from iunet3d.data import CTDataset, DataError, open_dataset

    if not path.exists():
        raise ValueError(f"--input {path}: no such file or directory")
    if (path / "zarr.json").is_file():
        try:
            dataset = open_dataset(path)
        except DataError:
            dataset = open_dataset(path.parent)  # a case directory: its parent is the dataset
            if path.name not in dataset:
                raise ValueError(f"--input {path}: neither an iunet3d dataset nor one of its cases") from None
            return dataset, [path.name]
        for name in cases or []:
            dataset.case(name)  # names a missing case
        return dataset, list(cases or dataset.case_names)
    from iunet3d.data import CaseJob, run_conversion
    from iunet3d.data.image_files import split_suffix

    stem = split_suffix(path.name)[0] if split_suffix(path.name) else path.name
    report = run_conversion([CaseJob(case=stem, image=path)], scratch / "input", progress=False)
    if report.failed:
        raise ValueError(f"--input {path}: {next(iter(report.failed.values()))}")
    return CTDataset(scratch / "input"), [stem]


def _predict(args: argparse.Namespace, dataset, cases: list[str]) -> int:
    import numpy as np
    import torch

    from iunet3d.data import CTCase
    from iunet3d.data.dataset_root import create_dataset_directory, dataset_lock, prepare_dataset, refresh_dataset
    from iunet3d.infer.case_metrics import case_metrics, write_metrics
    from iunet3d.infer.prediction_store import PREDICTION, write_prediction_case
    from iunet3d.infer.trained_model import load_trained_model, predict_volume

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    model = load_trained_model(args.checkpoint, device=device)
    labelled = [name for name in cases if dataset.case(name).has_label]
    model.check_input(dataset.class_names if labelled else None, what=f"dataset {dataset.path}")
    max_memory = None if args.max_memory is None else int(args.max_memory * 2**20)
    out = args.out.resolve()
    create_dataset_directory(out)
    rows = []
    with dataset_lock(out):
        prepare_dataset(out, model.class_names)
        for index, name in enumerate(cases, start=1):
            case = dataset.case(name)
            print(f"[{index}/{len(cases)}] {name} {case.shape}", flush=True)

            def fill(array, case=case):
                predict_volume(model, case.image_array, overlap=args.overlap, mirror=args.mirror,
                               batch_size=args.batch_size, max_memory=max_memory, scratch=out, device=device,
                               progress=not args.no_progress, out=array)  # fmt: skip

            written = write_prediction_case(case, out, model.class_names, fill)
            if case.has_label:
                prediction = np.asarray(CTCase(written).label_array(PREDICTION)[...])
                reference = np.asarray(case.label_array()[...])
                rows += case_metrics(name, prediction, reference, model.class_names, case.spacing)
            print(f"  -> {written / 'labels' / PREDICTION / '0'}", flush=True)
        refresh_dataset(out)
    if args.nifti is not None:
        from iunet3d.data import export_case

        args.nifti.mkdir(parents=True, exist_ok=True)
        for name in cases:  # the source file's orientation, spacing, origin and direction
            print(f"  -> {export_case(out, name, args.nifti / f'{name}.nii.gz', label=PREDICTION)}", flush=True)
    if rows:
        csv_path, json_path = write_metrics(rows, out)
        for row in rows:
            print(f"  {row['case']:<16} {row['class']:<12} Dice {row['dice']:.3f}  "
                  f"{row['predicted_ml']:.1f} ml predicted, {row['reference_ml']:.1f} ml reference")  # fmt: skip
        print(f"metrics: {csv_path}, {json_path}")
    return 0
