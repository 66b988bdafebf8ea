"""``iunet3d predict``: whole-volume segmentation of a dataset, one of its cases, or an image file."""

from __future__ import annotations

import argparse
import os
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
        help="memory for prediction buffers per process: the accumulator stays in memory when it fits, else it "
        "streams through a temporary Zarr store (default: half the machine's memory / processes per node)",
    )  # fmt: skip
    parser.add_argument(
        "--probabilities", action="store_true",
        help="also store the class probabilities (softmax, float16) at <case>/probabilities/0",
    )  # fmt: skip
    parser.add_argument("--nifti", type=Path, default=None, metavar="DIR", help="also write <case>.nii.gz predictions")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--precision", default="bf16", choices=("bf16", "fp16", "fp32"),
        help="autocast on CUDA (default bf16); CPU always runs float32",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    tracking = parser.add_argument_group("experiment tracking")
    tracking.add_argument("--wandb", action="store_true",
                          help="log the job as a W&B run (job_type predict): a table of the scored cases with three "
                               "planes through each worst case's largest error, a per-class summary, and a link to "
                               "the checkpoint's model artifact")  # fmt: skip
    tracking.add_argument(
        "--wandb-mode",
        default="auto",
        choices=("auto", "online", "offline"),
        help="auto (default): online with W&B credentials, else offline (WANDB_MODE wins)",
    )
    tracking.add_argument(
        "--wandb-project", default=None, help="W&B project (default: the training run's, else iunet3d)"
    )
    tracking.add_argument(
        "--wandb-dir",
        default=None,
        metavar="DIR",
        help="where W&B writes its files (DIR/wandb; default: the current directory)",
    )


def run_predict(args: argparse.Namespace) -> int:
    """Under torchrun, every rank runs this: the cases are shared out by voxel count."""
    from iunet3d.infer.windows import check_overlap

    check_overlap(args.overlap, "--overlap")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    if args.max_memory is not None and args.max_memory <= 0:
        raise ValueError(f"--max-memory: expected a positive number of MB, got {args.max_memory}")
    if args.wandb_project is not None:  # checked before any work, on every rank alike
        from iunet3d.tracking.wandb_run import WandbConfig

        try:
            WandbConfig(project=args.wandb_project)
        except ValueError as error:
            raise ValueError(f"--wandb-project: {str(error).split(': ', 1)[1]}") from None
    from iunet3d.distributed import setup_distributed, teardown_distributed

    distributed = setup_distributed(args.device, argument="--device")
    try:
        with tempfile.TemporaryDirectory(prefix="iunet3d-input-") as scratch:
            dataset, cases, source = resolve_input(args.input, args.case, Path(scratch) / f"rank{distributed.rank}")
            from iunet3d.infer.prediction_job import run_prediction_job

            max_memory = default_max_memory() if args.max_memory is None else int(args.max_memory * 2**20)
            return run_prediction_job(args, dataset, cases, distributed, max_memory, source)
    finally:
        teardown_distributed(distributed)


def default_max_memory() -> int:
    """Half the machine's memory, shared by the processes of this node (bytes)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return total // 2 // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def resolve_input(path: Path, cases: list[str] | None, scratch: Path):
    """(dataset, case names, source) for a dataset, a case directory of one, or an image file / DICOM
    directory (converted into a temporary dataset under ``scratch``); ``source`` is the resolved path of
    the input dataset or image file, recorded as what the output is a prediction of."""
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
            return dataset, [path.name], str(dataset.path.resolve())
        for name in cases or []:
            dataset.case(name)  # names a missing case
        return dataset, list(cases or dataset.case_names), str(dataset.path.resolve())
    from iunet3d.data import CaseJob, run_conversion
    from iunet3d.data.image_files import split_suffix

    stem = split_suffix(path.name)[0] if split_suffix(path.name) else path.name
    report = run_conversion([CaseJob(case=stem, image=path)], scratch / "input", progress=False)
    if report.failed:
        raise ValueError(f"--input {path}: {next(iter(report.failed.values()))}")
    return CTDataset(scratch / "input"), [stem], str(path.resolve())
