"""``iunet3d predict``: whole-volume segmentation of a dataset, one of its cases, or an image file."""

from __future__ import annotations

import argparse
import contextlib
import math
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


def run_predict(args: argparse.Namespace) -> int:
    """Under torchrun, every rank runs this: the cases are shared out by voxel count."""
    if not 0 <= args.overlap < 1:
        raise ValueError(f"--overlap: expected 0 <= overlap < 1, got {args.overlap}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    if args.max_memory is not None and args.max_memory <= 0:
        raise ValueError(f"--max-memory: expected a positive number of MB, got {args.max_memory}")
    from iunet3d.train.distributed import setup_distributed, teardown_distributed

    distributed = setup_distributed(args.device, argument="--device")
    try:
        with tempfile.TemporaryDirectory(prefix="iunet3d-input-") as scratch:
            dataset, cases = resolve_input(args.input, args.case, Path(scratch) / f"rank{distributed.rank}")
            return _predict(args, dataset, cases, distributed)
    finally:
        teardown_distributed(distributed)


def default_max_memory() -> int:
    """Half the machine's memory, shared by the processes of this node (bytes)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return total // 2 // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


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


def _predict(args: argparse.Namespace, dataset, cases: list[str], distributed) -> int:
    import torch

    from iunet3d.data import CTCase
    from iunet3d.data.dataset_root import create_dataset_directory, dataset_lock, prepare_dataset, refresh_dataset
    from iunet3d.data.storage import StorageOptions, chunk_shape
    from iunet3d.infer.case_metrics import case_metrics, write_metrics
    from iunet3d.infer.memory_plan import plan_memory
    from iunet3d.infer.prediction_store import PREDICTION, write_prediction_case
    from iunet3d.infer.sharding import shard_cases
    from iunet3d.infer.trained_model import load_trained_model, predict_volume

    device = distributed.device
    model = load_trained_model(args.checkpoint, device=device)
    labelled = [name for name in cases if dataset.case(name).has_label]
    model.check_input(dataset.class_names if labelled else None, what=f"dataset {dataset.path}")
    max_memory = default_max_memory() if args.max_memory is None else int(args.max_memory * 2**20)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision) if device.type == "cuda" else None
    out = args.out.resolve()
    with contextlib.ExitStack() as held:
        error = None
        if distributed.is_main:  # rank 0 prepares the output and holds its lock for the whole job
            try:
                create_dataset_directory(out)
                held.enter_context(dataset_lock(out))
                prepare_dataset(out, model.class_names)
            except ValueError as failure:
                error = str(failure)
        error = distributed.broadcast_object(error)
        if error is not None:
            raise ValueError(error)
        shards = shard_cases({name: math.prod(dataset.case(name).shape) for name in cases}, distributed.world_size)
        mine = shards[distributed.rank]
        say = _Say(distributed)
        rows = []
        for index, name in enumerate(mine, start=1):
            case = dataset.case(name)
            plan = plan_memory(len(model.class_names), case.shape, model.patch_size, args.batch_size,
                               chunk_shape(case.shape, case.spacing, StorageOptions()), args.probabilities,
                               max_memory)  # fmt: skip
            say(f"[{index}/{len(mine)}] {name} {case.shape}: {plan.describe(max_memory)}")

            def fill(labels, probabilities, case=case):
                predict_volume(model, case.image_array, overlap=args.overlap, mirror=args.mirror,
                               batch_size=args.batch_size, max_memory=max_memory, scratch=out, device=device,
                               autocast_dtype=autocast, progress=not args.no_progress, out=labels,
                               probabilities=probabilities)  # fmt: skip

            written = write_prediction_case(case, out, model.class_names, fill, probabilities=args.probabilities)
            if case.has_label:
                prediction = CTCase(written).label_array(PREDICTION)
                rows += case_metrics(name, prediction, case.label_array(), model.class_names, case.spacing)
            say(f"  -> {written / 'labels' / PREDICTION / '0'}")
        gathered = distributed.gather_objects(rows)  # also waits for every rank's cases
        if distributed.is_main:
            refresh_dataset(out)
    distributed.barrier()
    if args.nifti is not None:
        from iunet3d.data import export_case

        args.nifti.mkdir(parents=True, exist_ok=True)
        for name in mine:  # the source file's orientation, spacing, origin and direction
            say(f"  -> {export_case(out, name, args.nifti / f'{name}.nii.gz', label=PREDICTION)}")
    rows = sorted((row for part in gathered for row in part), key=lambda row: cases.index(row["case"]))
    if rows and distributed.is_main:
        csv_path, json_path = write_metrics(rows, out)
        for row in rows:
            print(f"  {row['case']:<16} {row['class']:<12} Dice {row['dice']:.3f}  "
                  f"{row['predicted_ml']:.1f} ml predicted, {row['reference_ml']:.1f} ml reference")  # fmt: skip
        print(f"metrics: {csv_path}, {json_path}")
    return 0


class _Say:
    """Prints a line in one write (ranks share torchrun's output), prefixed with the rank under torchrun."""

    def __init__(self, distributed):
        self.prefix = f"[rank {distributed.rank}] " if distributed.active else ""

    def __call__(self, text: str) -> None:
        print(f"{self.prefix}{text}\n", end="", flush=True)
