"""One rank's part of ``iunet3d predict``: its share of the cases predicted into the output dataset.

Rank 0 first checks that the output may take the cases (``check_output``: predict never replaces what it
did not write), then opens it for writing and holds its lock for the whole job; every rank predicts the
cases ``shard_cases`` gives it (balanced by voxel count), each staged so that a killed job leaves no
case that looks complete, with temporary files under ``<out>/.partial`` where a rerun removes them; the
per-case metrics are gathered onto rank 0, which writes them. ``--out`` equal to the input dataset adds
the prediction to its cases in place.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from iunet3d.data import CTCase, CTDataset, export_case
from iunet3d.data.case_writer import DEFAULT_LABEL_NAME
from iunet3d.data.dataset_root import writing_dataset
from iunet3d.data.errors import DataError
from iunet3d.data.staging import PARTIAL_DIR, check_inside, remove_tree
from iunet3d.distributed import Distributed
from iunet3d.infer.case_metrics import case_metrics, write_metrics
from iunet3d.infer.memory_plan import plan_memory
from iunet3d.infer.prediction_store import (
    PREDICTION,
    check_output,
    mark_output,
    prediction_chunks,
    prediction_record,
    write_prediction_case,
    write_prediction_in_place,
)
from iunet3d.infer.prediction_tracking import case_result, finish_tracking, start_tracking
from iunet3d.infer.sharding import shard_cases
from iunet3d.infer.trained_model import TrainedModel, accumulator_kind, load_trained_model, predict_volume
from iunet3d.models.precision import autocast_dtype_for
from iunet3d.tracking.case_table import CaseResult, keep_worst_panels
from iunet3d.tracking.wandb_run import WandbConfig

#: A scan coarser than a model's target spacing by more than this along an axis is interpolated into detail
#: the network never saw in training (it was trained on real voxels of the target size), so predict warns.
COARSE_SCAN_FACTOR = 2.0
#: A network trained on its cases' own voxels (no target spacing) learned shapes at their voxel size; a scan
#: whose spacing differs from the training data's median by more than this along an axis shows them
#: stretched, so predict warns (training at a target spacing, ``data.target_spacing = "auto"``, avoids it).
NATIVE_SPACING_FACTOR = 1.2


def run_prediction_job(args: argparse.Namespace, dataset: CTDataset, cases: list[str], distributed: Distributed,
                       max_memory: int, source: str) -> int:  # fmt: skip
    """Predict ``cases`` of ``dataset`` into ``args.out`` with the options of ``iunet3d predict``; ``source``
    (the resolved input dataset or image file) is recorded as what the output is a prediction of."""
    model = load_trained_model(args.checkpoint, device=distributed.device)
    opened = {name: dataset.case(name) for name in cases}
    labelled = [name for name, case in opened.items() if _reference_label(case)]
    model.check_input(dataset.class_names if labelled else None, what=f"dataset {dataset.path}")
    out, say = args.out.resolve(), _Say(distributed)
    in_place = out == dataset.path.resolve()
    mine = shard_cases({name: math.prod(case.shape) for name, case in opened.items()}, distributed.world_size)
    mine = mine[distributed.rank]
    tracked, panels = bool(getattr(args, "wandb", False)), WandbConfig().image_panels
    with _output_dataset(out, source, list(opened.values()), in_place, model.class_names, distributed):
        logger = start_tracking(args, model, source, cases, distributed.rank)
        try:
            rows, results = [], []
            for index, name in enumerate(mine, start=1):
                job = _CaseJob(opened[name], out, source, in_place, f"[{index}/{len(mine)}]")
                case_rows, result = _predict_case(args, model, job, max_memory, distributed, say, tracked)
                rows += case_rows
                results += [result] if result is not None else []
            gathered = distributed.gather_objects((rows, keep_worst_panels(results, panels)))  # waits for all ranks
            if distributed.is_main:
                _remove_scratch(out)
                order = {name: position for position, name in enumerate(cases)}
                scored = sorted((r for part in gathered for r in part[1]), key=lambda r: order[r.case])
                finish_tracking(logger, scored, model.class_names, panels)
        finally:
            logger.close()  # after a failure too: what was logged reaches W&B
    distributed.barrier()
    if args.nifti is not None:
        args.nifti.mkdir(parents=True, exist_ok=True)
        for name in mine:  # the source file's orientation, spacing, origin and direction
            target = check_inside(args.nifti / f"{opened[name].name}.nii.gz", args.nifti, "NIfTI file")
            say(f"  -> {export_case(out, opened[name].name, target, label=PREDICTION)}")
    if distributed.is_main:
        _report(sorted((row for part in gathered for row in part[0]), key=lambda row: cases.index(row["case"])), out)
    return 0


@contextlib.contextmanager
def _output_dataset(out: Path, source: str, cases: list[CTCase], in_place: bool, class_names: list[str],
                    distributed: Distributed) -> Iterator[None]:  # fmt: skip
    """Rank 0 checks that ``out`` may take these cases (before writing anything), then holds it open for
    writing (its lock, and the root rebuilt at the end) and makes the scratch directory; every rank
    learns whether that worked."""
    with contextlib.ExitStack() as held:
        error = None
        if distributed.is_main:
            try:
                check_output(out, source, cases, in_place)
                held.enter_context(writing_dataset(out, class_names))
                if not in_place:
                    mark_output(out, source)
                scratch = check_inside(_scratch(out), out, "scratch directory")
                scratch.mkdir(parents=True, exist_ok=True)  # the next run's writing_dataset removes it
            except ValueError as failure:
                error = str(failure)
        error = distributed.broadcast_object(error)
        if error is not None:
            raise ValueError(error)
        yield


@dataclasses.dataclass
class _CaseJob:
    case: CTCase
    out: Path
    source: str
    in_place: bool
    counter: str


def _predict_case(args, model: TrainedModel, job: _CaseJob, max_memory: int, distributed, say,
                  tracked: bool) -> tuple[list[dict], CaseResult | None]:  # fmt: skip
    """Predict ``job.case`` whole into ``job.out``; its metric rows when it has a label, and (``tracked``) its
    result for the W&B table, with three planes through its largest error."""
    case = job.case
    target_shape = model.target_grid(case.shape, case.spacing)
    plan = plan_memory(len(model.class_names), case.shape, model.patch_size, args.batch_size,
                       prediction_chunks(case), args.probabilities, max_memory,
                       target_shape=target_shape)  # fmt: skip
    resampling = "" if target_shape is None else f"{resampling_line(case, model.target_spacing, target_shape)}; "
    kind = accumulator_kind(plan, len(model.class_names), target_shape or case.shape, model.patch_size, max_memory)
    say(f"{job.counter} {case.name} {case.shape}: {resampling}{plan.describe(max_memory, kind)}")
    warning = spacing_warning(model, case.spacing)
    if warning is not None:
        warnings.warn(f"case {case.name}: {warning}", UserWarning, stacklevel=2)
    autocast = autocast_dtype_for(args.precision, distributed.device)
    image = _CaseArray(case.image_array, case, "image")

    def fill(labels, probabilities):
        predict_volume(model, image, overlap=args.overlap, mirror=args.mirror, batch_size=args.batch_size,
                       plan=plan, scratch=_scratch(job.out), device=distributed.device, autocast_dtype=autocast,
                       progress=not args.no_progress, out=labels, probabilities=probabilities,
                       spacing=case.spacing, keep_freed_memory=True)  # fmt: skip

    write = write_prediction_in_place if job.in_place else write_prediction_case
    record = prediction_record(job.source, case.name)
    with _write_errors(case, job.out):
        written = write(case, job.out, model.class_names, fill, probabilities=args.probabilities, record=record)
    say(f"  -> {written / 'labels' / PREDICTION / '0'}")
    reference = _reference_label(case)
    if reference is None:
        return [], None
    prediction = _CaseArray(CTCase(written).label_array(PREDICTION), case, "prediction")
    reference = _CaseArray(case.label_array(reference), case, f"label {reference!r}")
    if tracked:  # the error search needs both volumes whole: read them once, for the metrics too
        prediction, reference = prediction[...], reference[...]
    rows = case_metrics(case.name, prediction, reference, model.class_names, case.spacing)
    return rows, case_result(case, image, prediction, reference, rows, model, panel=True) if tracked else None


def resampling_line(case: CTCase, target: Sequence[float], target_shape: Sequence[int]) -> str:
    """E.g. ``resampled 5.0x0.8x0.8 -> 1.5x0.8x0.8 mm, grid 40x160x160 -> 133x160x160``."""
    grid = f"{'x'.join(map(str, case.shape))} -> {'x'.join(map(str, target_shape))}"
    return f"resampled {_mm(case.spacing)[:-3]} -> {_mm(target)}, grid {grid}"


def spacing_warning(model: TrainedModel, spacing: Sequence[float]) -> str | None:
    """Why predicting a scan of ``spacing`` (z, y, x) mm with ``model`` may be unreliable, or None."""
    axes = "zyx"
    if model.target_spacing is not None:
        coarse = [a for a, s, t in zip(axes, spacing, model.target_spacing, strict=True) if s > COARSE_SCAN_FACTOR * t]
        if coarse:
            return (f"spacing {_mm(spacing)} is more than {COARSE_SCAN_FACTOR:g}x coarser than the model's target "
                    f"spacing {_mm(model.target_spacing)} along {', '.join(coarse)}: the network sees interpolated "
                    "detail it was not trained on")  # fmt: skip
        return None
    if model.training_spacing is None:
        return None
    off = [a for a, s, t in zip(axes, spacing, model.training_spacing, strict=True)
           if max(s / t, t / s) > NATIVE_SPACING_FACTOR]  # fmt: skip
    if not off:
        return None
    return (f"spacing {_mm(spacing)} differs from the training data's {_mm(model.training_spacing)} by more than "
            f"{NATIVE_SPACING_FACTOR:g}x along {', '.join(off)}, and the model runs on each scan's own voxels: "
            'its predictions are unreliable (train with data.target_spacing = "auto")')  # fmt: skip


def _mm(spacing: Sequence[float]) -> str:
    return "x".join(str(round(float(v), 3)) for v in spacing) + " mm"


def _reference_label(case: CTCase) -> str | None:
    """The ground-truth label to score against (never an earlier prediction), or None."""
    names = [name for name in case.label_names if name != PREDICTION]
    return None if not names else DEFAULT_LABEL_NAME if DEFAULT_LABEL_NAME in names else names[0]


@contextlib.contextmanager
def _write_errors(case: CTCase, out: Path) -> Iterator[None]:
    """A failed write (disk full, no permission, a file in the way) as one line naming the case and path."""
    try:
        yield
    except shutil.Error as error:  # copytree: a list of (source, destination, reason)
        failures = [entry for entry in error.args[0] if isinstance(entry, tuple)] if error.args else []
        if not failures:
            raise ValueError(f"case {case.name}: writing its prediction into {out} failed ({error})") from None
        _, destination, reason = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise ValueError(f"case {case.name}: cannot write {destination}: {reason}{more}") from None
    except OSError as error:
        path = error.filename or out
        raise ValueError(f"case {case.name}: cannot write {path}: {error.strerror or error}") from None


class _CaseArray:
    """A case's array whose read errors (e.g. a corrupted chunk) are DataErrors naming the case and region."""

    def __init__(self, array, case: CTCase, what: str):
        self.array, self.case, self.what = array, case, what
        self.shape, self.dtype, self.chunks = array.shape, array.dtype, getattr(array, "chunks", None)

    def __getitem__(self, region):
        try:
            return self.array[region]
        except Exception as error:
            raise DataError(
                f"case {self.case.name}: reading its {self.what} ({self.case.path}) failed at {_describe(region)} "
                f"({type(error).__name__}: {error}); the store may be corrupted"
            ) from error


def _describe(region) -> str:
    parts = region if isinstance(region, tuple) else (region,)
    return "[" + ", ".join(f"{p.start}:{p.stop}" if isinstance(p, slice) else str(p) for p in parts) + "]"


def _scratch(out: Path) -> Path:
    """Temporary files of this job (streamed accumulators): under ``.partial``, which a rerun removes."""
    return out / PARTIAL_DIR / ".scratch"


def _remove_scratch(out: Path) -> None:
    remove_tree(_scratch(out), out, "scratch directory")
    with contextlib.suppress(OSError):  # other leftovers stay for the next run to remove
        (out / PARTIAL_DIR).rmdir()


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
