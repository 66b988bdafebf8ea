"""Per-case and per-class validation tables for the dashboard, W&B-free until ``to_wandb``.

A ``CaseResult`` holds one held-out case: its spacing, per-class Dice and volumes, and optionally a three-plane
panel. ``CaseTable`` (one row per case) and ``ClassSummaryTable`` (one row per foreground class) turn a list of
them into plain rows and, lazily importing ``wandb``, into ``wandb.Table`` objects (NaN becomes None there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from iunet3d.tracking.wandb_run import SegmentationPanel


@dataclass
class CaseResult:
    """One case: Dice (NaN when a class is in neither prediction nor reference) and volumes per foreground class."""

    case: str
    spacing: tuple[float, float, float]  #: (z, y, x) mm
    dice: dict[str, float]  #: foreground class name -> Dice
    predicted_ml: dict[str, float]
    reference_ml: dict[str, float]
    panel: SegmentationPanel | None = None  #: e.g. ``three_plane_panel`` through the largest error

    def __post_init__(self) -> None:
        try:
            spacing = tuple(float(v) for v in self.spacing)
        except (TypeError, ValueError):
            spacing = ()
        if len(spacing) != 3 or not all(v > 0 and math.isfinite(v) for v in spacing):
            raise ValueError(f"spacing: expected three positive voxel sizes (z, y, x) in mm, got {self.spacing!r}")
        self.spacing = spacing
        for name in ("dice", "predicted_ml", "reference_ml"):
            values = getattr(self, name)
            if set(values) != set(self.dice):
                raise ValueError(f"{name}: expected the classes of dice {sorted(self.dice)}, got {sorted(values)}")
            setattr(self, name, {key: float(value) for key, value in values.items()})

    @property
    def dice_mean(self) -> float:
        """Mean Dice over the classes where it is defined; NaN when it is defined for none."""
        defined = [value for value in self.dice.values() if not math.isnan(value)]
        return sum(defined) / len(defined) if defined else math.nan

    @classmethod
    def from_metric_rows(cls, case: str, spacing: Sequence[float], rows: Sequence[dict]) -> CaseResult:
        """From ``iunet3d.infer.case_metrics`` rows (``{"case", "class", "dice", "predicted_ml", "reference_ml"}``
        per foreground class); rows of other cases are ignored."""
        mine = [row for row in rows if row["case"] == case]
        if not mine:
            raise ValueError(f"rows: no row of case {case!r}")
        return cls(case, tuple(spacing), *({row["class"]: row[column] for row in mine}
                                            for column in ("dice", "predicted_ml", "reference_ml")))  # fmt: skip

    @classmethod
    def from_counts(cls, case: str, spacing: Sequence[float], counts, class_names: Sequence[str]) -> CaseResult:
        """From counts (K, 3): true positives, false positives, false negatives per class (a numpy array or a CPU
        tensor, as ``volume_confusion_counts`` returns), K = len(class_names); class 0 (background) is skipped.
        Volume in ml: voxels * prod(spacing) / 1000; Dice: 2 TP / (2 TP + FP + FN), NaN when that is 0 / 0."""
        counts = np.asarray(counts, dtype=np.float64)
        if counts.shape != (len(class_names), 3):
            raise ValueError(f"counts: expected ({len(class_names)}, 3) for {len(class_names)} classes "
                             f"(true positives, false positives, false negatives), got {counts.shape}")  # fmt: skip
        result = cls(case, tuple(spacing), {}, {}, {})  # checks spacing
        voxel_ml = math.prod(result.spacing) / 1000
        for (true_positive, false_positive, false_negative), name in zip(counts[1:], class_names[1:], strict=True):
            denominator = 2 * true_positive + false_positive + false_negative
            result.dice[name] = float(2 * true_positive / denominator) if denominator else math.nan
            result.predicted_ml[name] = float((true_positive + false_positive) * voxel_ml)
            result.reference_ml[name] = float((true_positive + false_negative) * voxel_ml)
        return result


def worst_cases(results: Sequence[CaseResult], n: int) -> list[str]:
    """The names of the ``n`` results with the lowest ``dice_mean``, lowest first; NaN last; ties in input order."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected a number of cases >= 0, got {n!r}")
    order = sorted(range(len(results)), key=lambda i: (math.isnan(results[i].dice_mean), results[i].dice_mean, i))
    return [results[i].case for i in order[:n]]


def keep_worst_panels(results: list[CaseResult], panels: int) -> list[CaseResult]:
    """``results`` (the same list, changed in place) with the panels of all but the ``panels`` worst cases that have
    one (``worst_cases``) set to None: less to gather onto rank 0 and to log."""
    keep = set(worst_cases([result for result in results if result.panel is not None], panels))
    for result in results:
        if result.case not in keep:
            result.panel = None
    return results


def _check(class_names: Sequence[str], results: Sequence[CaseResult]) -> None:
    if len(class_names) < 2:
        raise ValueError(f"class_names: expected background and at least one foreground class, got {class_names!r}")
    for index, result in enumerate(results):
        if set(result.dice) != set(class_names[1:]):
            raise ValueError(f"results[{index}]: expected the foreground classes {list(class_names[1:])}, got "
                             f"{list(result.dice)} (case {result.case!r})")  # fmt: skip


def _for_wandb(value: object) -> object:
    return None if isinstance(value, float) and math.isnan(value) else value


@dataclass
class CaseTable:
    """One row per case: spacing, Dice and volumes per foreground class, and an image cell (the case's panel)."""

    key: str  #: history key, e.g. "val/cases"
    class_names: list[str]  #: background first
    results: list[CaseResult]

    def __post_init__(self) -> None:
        _check(self.class_names, self.results)

    @property
    def columns(self) -> list[str]:
        per_class = [f"{column}/{name}" for name in self.class_names[1:]
                     for column in ("dice", "predicted_ml", "reference_ml")]  # fmt: skip
        return ["case", "spacing_mm", "dice_mean", *per_class, "image"]

    def rows(self) -> list[list]:
        """Plain values in ``columns`` order: str, floats as computed (NaN kept), the panel or None."""
        rows = []
        for result in self.results:
            per_class = [values[name] for name in self.class_names[1:]
                         for values in (result.dice, result.predicted_ml, result.reference_ml)]  # fmt: skip
            spacing = " x ".join(f"{v:g}" for v in result.spacing)
            rows.append([result.case, spacing, result.dice_mean, *per_class, result.panel])
        return rows

    def to_wandb(self):
        """A ``wandb.Table``; NaN becomes None and panels ``wandb.Image`` objects with their masks."""
        import wandb

        data = [[_for_wandb(v) for v in row[:-1]] + [None if row[-1] is None else row[-1].to_wandb()]
                for row in self.rows()]  # fmt: skip
        return wandb.Table(columns=self.columns, data=data)


@dataclass
class ClassSummaryTable:
    """One row per foreground class: over the cases where its Dice is defined, their count, mean, median, minimum
    and the case of the minimum; mean volumes over all cases."""

    key: str  #: history key, e.g. "val/classes"
    class_names: list[str]  #: background first
    results: list[CaseResult]

    def __post_init__(self) -> None:
        _check(self.class_names, self.results)

    @property
    def columns(self) -> list[str]:
        return ["class", "cases", "dice_mean", "dice_median", "dice_min", "worst_case", "predicted_ml_mean",
                "reference_ml_mean"]  # fmt: skip

    def rows(self) -> list[list]:
        """Plain values in ``columns`` order (NaN for statistics of no value, worst_case None then)."""
        rows = []
        for name in self.class_names[1:]:
            defined = [(r.dice[name], i) for i, r in enumerate(self.results) if not math.isnan(r.dice[name])]
            dice = [value for value, _ in defined]
            worst = min(defined) if defined else None  # the first case on a tie
            rows.append([
                name, len(defined),
                float(np.mean(dice)) if dice else math.nan,
                float(np.median(dice)) if dice else math.nan,
                min(dice) if dice else math.nan,
                None if worst is None else self.results[worst[1]].case,
                float(np.mean([r.predicted_ml[name] for r in self.results])) if self.results else math.nan,
                float(np.mean([r.reference_ml[name] for r in self.results])) if self.results else math.nan,
            ])  # fmt: skip
        return rows

    def to_wandb(self):
        """A ``wandb.Table``; NaN becomes None."""
        import wandb

        return wandb.Table(columns=self.columns, data=[[_for_wandb(v) for v in row] for row in self.rows()])
