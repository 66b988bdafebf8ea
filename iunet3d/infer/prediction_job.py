"""One rank's part of ``iunet3d predict``: its share of the cases predicted into the output dataset.

Rank 0 opens the output for writing and holds its lock for the whole job; every rank predicts the
cases ``shard_cases`` gives it (balanced by voxel count), each staged so that a killed job leaves no
case that looks complete; the per-case metrics are gathered onto rank 0, which writes them.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

from iunet3d.data import CTCase, CTDataset, export_case
from iunet3d.data.dataset_root import writing_dataset
from iunet3d.distributed import Distributed
from iunet3d.infer.case_metrics import case_metrics, write_metrics
from iunet3d.infer.memory_plan import plan_memory
from iunet3d.infer.prediction_store import PREDICTION, prediction_chunks, write_prediction_case
from iunet3d.infer.sharding import shard_cases
from iunet3d.infer.trained_model import TrainedModel, load_trained_model, predict_volume
from iunet3d.models.precision import autocast_dtype_for


def run_prediction_job(args: argparse.Namespace, dataset: CTDataset, cases: list[str], distributed: Distributed,
                       max_memory: int) -> int:  # fmt: skip
    """Predict ``cases`` of ``dataset`` into ``args.out`` with the options of ``iunet3d predict``."""
    model = load_trained_model(args.checkpoint, device=distributed.device)
    labelled = [name for name in cases if dataset.case(name).has_label]
    model.check_input(dataset.class_names if labelled else None, what=f"dataset {dataset.path}")
    out, say = args.out.resolve(), _Say(distributed)
    mine = shard_cases({name: math.prod(dataset.case(name).shape) for name in cases}, distributed.world_size)
    mine = mine[distributed.rank]
    with _output_dataset(out, model.class_names, distributed):
        rows = []
        for index, name in enumerate(mine, start=1):
            rows += _predict_case(args, model, dataset.case(name), out, max_memory, distributed, say,
                                  f"[{index}/{len(mine)}]")  # fmt: skip
        gathered = distributed.gather_objects(rows)  # also waits for every rank's cases
    distributed.barrier()
    if args.nifti is not None:
        args.nifti.mkdir(parents=True, exist_ok=True)
        for name in mine:  # the source file's orientation, spacing, origin and direction
            say(f"  -> {export_case(out, name, args.nifti / f'{name}.nii.gz', label=PREDICTION)}")
    if distributed.is_main:
        _report(sorted((row for part in gathered for row in part), key=lambda row: cases.index(row["case"])), out)
    return 0


@contextlib.contextmanager
def _output_dataset(out: Path, class_names: list[str], distributed: Distributed) -> Iterator[None]:
    """Rank 0 holds ``out`` open for writing (its lock, and the root rebuilt at the end); every rank
    learns whether opening it worked."""
    with contextlib.ExitStack() as held:
        error = None
        if distributed.is_main:
            try:
                held.enter_context(writing_dataset(out, class_names))
            except ValueError as failure:
                error = str(failure)
        error = distributed.broadcast_object(error)
        if error is not None:
            raise ValueError(error)
        yield


def _predict_case(args, model: TrainedModel, case: CTCase, out: Path, max_memory: int, distributed, say,
                  counter: str) -> list[dict]:  # fmt: skip
    """Predict ``case`` whole into ``out``; its metric rows when it has a label."""
    plan = plan_memory(len(model.class_names), case.shape, model.patch_size, args.batch_size,
                       prediction_chunks(case), args.probabilities, max_memory)  # fmt: skip
    say(f"{counter} {case.name} {case.shape}: {plan.describe(max_memory)}")
    autocast = autocast_dtype_for(args.precision, distributed.device)

    def fill(labels, probabilities):
        predict_volume(model, case.image_array, overlap=args.overlap, mirror=args.mirror, batch_size=args.batch_size,
                       plan=plan, scratch=out, device=distributed.device, autocast_dtype=autocast,
                       progress=not args.no_progress, out=labels, probabilities=probabilities)  # fmt: skip

    written = write_prediction_case(case, out, model.class_names, fill, probabilities=args.probabilities)
    say(f"  -> {written / 'labels' / PREDICTION / '0'}")
    if not case.has_label:
        return []
    prediction = CTCase(written).label_array(PREDICTION)
    return case_metrics(case.name, prediction, case.label_array(), model.class_names, case.spacing)


def _report(rows: list[dict], out: Path) -> None:
    if not rows:
        return
    csv_path, json_path = write_metrics(rows, out)
    for row in rows:
        print(f"  {row['case']:<16} {row['class']:<12} Dice {row['dice']:.3f}  "
              f"{row['predicted_ml']:.1f} ml predicted, {row['reference_ml']:.1f} ml reference")  # fmt: skip
    print(f"metrics: {csv_path}, {json_path}")


class _Say:
    """Prints a line in one write (ranks share torchrun's output), prefixed with the rank under torchrun."""

    def __init__(self, distributed: Distributed):
        self.prefix = f"[rank {distributed.rank}] " if distributed.active else ""

    def __call__(self, text: str) -> None:
        print(f"{self.prefix}{text}\n", end="", flush=True)
