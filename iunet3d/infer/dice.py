"""Per-class Dice from counted voxels, shared by training validation and whole-volume prediction."""

from __future__ import annotations

import math

import torch


def confusion_counts(prediction: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class voxel counts (num_classes, 3): true positives, false positives, false negatives.

    prediction, target: integer class maps of the same shape. Counts add up over patches and ranks, so
    the Dice they give is that of all voxels together, not a mean of per-patch Dice values.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    index = target.reshape(-1).long() * num_classes + prediction.reshape(-1).long()
    confusion = torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    true_positive = confusion.diagonal()
    false_positive = confusion.sum(0) - true_positive  # predicted as the class, labelled otherwise
    false_negative = confusion.sum(1) - true_positive
    return torch.stack([true_positive, false_positive, false_negative], dim=1).to(torch.float64)


def dice_scores(counts: torch.Tensor, class_names: list[str]) -> dict[str, float]:
    """{foreground class name: Dice} from ``confusion_counts``; NaN for a class absent from both the
    prediction and the ground truth (it does not enter ``mean_dice``)."""
    scores = {}
    for value, name in enumerate(class_names):
        if value == 0:
            continue
        true_positive, false_positive, false_negative = counts[value].tolist()
        denominator = 2 * true_positive + false_positive + false_negative
        scores[name] = 2 * true_positive / denominator if denominator else math.nan
    return scores


def mean_dice(scores: dict[str, float]) -> float:
    """Mean of the defined per-class Dice values (NaN if none is defined)."""
    defined = [score for score in scores.values() if not math.isnan(score)]
    return sum(defined) / len(defined) if defined else math.nan
