"""Per-case, per-class Dice and volumes of a prediction against ground truth, as CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from iunet3d.data.staging import check_inside, write_text_atomically
from iunet3d.infer.accumulator import block_regions
from iunet3d.infer.dice import confusion_counts, dice_scores

COLUMNS = ("case", "class", "dice", "predicted_ml", "reference_ml")


def volume_confusion_counts(prediction, reference, num_classes: int, block: Sequence[int] | None = None):
    """``confusion_counts`` of two label volumes (D, H, W; numpy or Zarr) summed over ``block``-sized
    regions (default: the prediction's chunks, else the whole volume), so memory stays bounded."""
    if tuple(prediction.shape) != tuple(reference.shape):
        raise ValueError(f"prediction {tuple(prediction.shape)} and reference {tuple(reference.shape)} differ in shape")
    block = tuple(block or getattr(prediction, "chunks", None) or prediction.shape)
    counts = torch.zeros(num_classes, 3, dtype=torch.float64)
    for region in block_regions(tuple(prediction.shape), block):
        counts += confusion_counts(torch.from_numpy(np.asarray(prediction[region])),
                                   torch.from_numpy(np.asarray(reference[region])), num_classes)  # fmt: skip
    return counts


def case_metrics(case: str, prediction, reference, class_names: Sequence[str], spacing: Sequence[float]) -> list[dict]:
    """One row per foreground class: Dice (NaN when the class is in neither) and both volumes in ml.
    prediction, reference: label volumes (D, H, W), numpy or Zarr (counted chunk by chunk)."""
    try:
        counts = volume_confusion_counts(prediction, reference, len(class_names))
    except ValueError as error:
        raise ValueError(f"{case}: {error}") from None
    dice = dice_scores(counts, list(class_names))
    voxel_ml = math.prod(spacing) / 1000
    rows = []
    for value, name in enumerate(class_names[1:], start=1):
        true_positive, false_positive, false_negative = counts[value].tolist()
        volumes = {"predicted_ml": (true_positive + false_positive) * voxel_ml,
                   "reference_ml": (true_positive + false_negative) * voxel_ml}  # fmt: skip
        rows.append({"case": case, "class": name, "dice": float(dice[name]), **volumes})
    return rows


def write_metrics(rows: Sequence[dict], out: Path) -> tuple[Path, Path]:
    """``out/metrics.csv`` (one row per case and class) and ``out/metrics.json`` (rows plus per-class means)."""
    csv_path, json_path = check_inside(out / "metrics.csv", out), check_inside(out / "metrics.json", out)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(csv_path, table.getvalue())
    classes = list(dict.fromkeys(row["class"] for row in rows))
    means = {}
    for name in classes:
        values = [row["dice"] for row in rows if row["class"] == name and not math.isnan(row["dice"])]
        means[name] = sum(values) / len(values) if values else None
    defined = [value for value in means.values() if value is not None]
    json_rows = [{key: None if isinstance(v, float) and math.isnan(v) else v for key, v in row.items()} for row in rows]
    summary = {"mean_dice": sum(defined) / len(defined) if defined else None, "dice": means, "rows": json_rows}
    write_text_atomically(json_path, json.dumps(summary, indent=2) + "\n")  # NaN (class in neither) is null
    return csv_path, json_path
