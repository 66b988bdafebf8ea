"""``iunet3d predict --wandb``: a prediction job as a W&B run (``job_type="predict"``).

Rank 0 starts the run before the first case (so a W&B problem is one warning up front, never a failed job),
each rank scores its cases and makes the three-plane panels of its worst ones, and rank 0 logs one table of
cases and one per-class summary when every case is done. The run declares the checkpoint's model artifact as
its input (``use_artifact``) when the checkpoint was logged as one by a training run: the dashboard then links
the training to this prediction. W&B refuses ``use_artifact`` in offline mode, so an offline job records the
artifact reference in its config (``checkpoint.artifact``) and says so.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from iunet3d.data import CTCase
from iunet3d.infer.trained_model import TrainedModel
from iunet3d.tracking.case_table import CaseResult, CaseTable, ClassSummaryTable, keep_worst_panels
from iunet3d.tracking.error_planes import largest_error_center, three_plane_panel
from iunet3d.tracking.wandb_run import MetricLogger, NullLogger, WandbConfig, create_logger

CASES_KEY, CLASSES_KEY = "predict/cases", "predict/classes"


def start_tracking(args: argparse.Namespace, model: TrainedModel, source: str, cases: Sequence[str],
                   rank: int) -> MetricLogger:  # fmt: skip
    """The job's W&B run on rank 0 with ``--wandb`` (a ``NullLogger`` elsewhere); its config records the
    checkpoint, its provenance and the prediction options."""
    if not getattr(args, "wandb", False) or rank != 0:
        return NullLogger()
    provenance = model.provenance
    config = WandbConfig(mode=args.wandb_mode, project=args.wandb_project or provenance.get("wandb_project") or
                         "iunet3d", entity=provenance.get("wandb_entity"), dir=args.wandb_dir)  # fmt: skip
    run_config = {
        "job": "predict",
        "checkpoint": {
            "path": str(Path(args.checkpoint).resolve()),
            "step": model.step,
            "training_run": provenance.get("wandb_id"),
            "artifact": provenance.get("wandb_artifact"),
            "git_revision": provenance.get("git_revision"),
        },  # fmt: skip
        "input": source,
        "out": str(Path(args.out).resolve()),
        "cases": len(cases),
        "options": {
            "overlap": args.overlap,
            "mirror": args.mirror,
            "batch_size": args.batch_size,
            "precision": args.precision,
            "probabilities": args.probabilities,
        },  # fmt: skip
        "class_names": list(model.class_names),
    }
    logger = create_logger(config, Path(args.wandb_dir or "."), run_config, job_type="predict")
    artifact = provenance.get("wandb_artifact")
    if artifact:
        project = provenance.get("wandb_project") or config.project
        entity = provenance.get("wandb_entity")
        logger.use_checkpoint(f"{entity}/{project}/{artifact}" if entity else f"{project}/{artifact}")
    return logger


def case_result(case: CTCase, image, prediction, reference, rows: list[dict], model: TrainedModel,
                panel: bool) -> CaseResult:  # fmt: skip
    """One scored case for the job's table; with ``panel``, three planes through its largest error.
    image, prediction, reference: (D, H, W) arrays of the case (read whole for the error search: two uint8
    label volumes)."""
    result = CaseResult.from_metric_rows(case.name, tuple(case.spacing), rows)
    if panel:
        predicted, truth = np.asarray(prediction[...]), np.asarray(reference[...])
        center = largest_error_center(truth, predicted, case.spacing)
        result.panel = three_plane_panel(f"{CASES_KEY}/{case.name}", image, truth, predicted, center, case.spacing,
                                         list(model.class_names), normalize=model.normalization)  # fmt: skip
    return result


def finish_tracking(logger: MetricLogger, results: list[CaseResult], class_names: Sequence[str],
                    panels: int) -> None:  # fmt: skip
    """Log the table of cases (image cells for the ``panels`` worst) and the per-class summary, then close."""
    if results:
        results = keep_worst_panels(results, panels)
        logger.log_tables([CaseTable(CASES_KEY, list(class_names), results),
                           ClassSummaryTable(CLASSES_KEY, list(class_names), results)], 0)  # fmt: skip
        means = [r.dice_mean for r in results if not np.isnan(r.dice_mean)]
        logger.update_summary({"predict/dice_mean": float(np.mean(means)) if means else None,
                               "predict/scored_cases": len(results)})  # fmt: skip
    logger.close()
