"""Whole-volume validation: the held-out cases predicted by sliding window, shared out across ranks.

This is what ``iunet3d predict`` computes (the same Gaussian-weighted windows, ``predict_volume``), so the
Dice on the dashboard is the Dice a user gets from the checkpoint, not a patch-level approximation.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from iunet3d.infer.case_metrics import volume_confusion_counts
from iunet3d.infer.dice import dice_scores, mean_dice
from iunet3d.infer.sharding import shard_cases
from iunet3d.infer.trained_model import TrainedModel, predict_volume
from iunet3d.tracking.wandb_run import SegmentationPanel
from iunet3d.train.validator import ValidationResult, Validator


class VolumeValidator(Validator):
    """Predicts this rank's share of the held-out cases whole and sums the Dice counts over all ranks.

    Cases are shared out by voxel count (``shard_cases``); a rank with no case contributes zero counts.
    Panels: per case, the z slice with the most ground-truth foreground, gathered from all ranks onto the
    main one in case order.
    """

    def __init__(self, *args, scratch: Path | None = None, target_spacing: tuple[float, float, float] | None = None,
                 image_interpolation: str = "linear", **kwargs):  # fmt: skip
        """``Validator``'s arguments; ``scratch``: where a streamed accumulator may be written;
        ``target_spacing`` (z, y, x) mm the network is trained at (None: each case's own voxels) and the
        ``image_interpolation`` ("linear" or "cubic") that resamples images to it. Labels, metrics and
        panels stay on each case's own grid."""
        super().__init__(*args, **kwargs)
        self.scratch = scratch
        self.target_spacing = None if target_spacing is None else tuple(float(v) for v in target_spacing)
        self.image_interpolation = image_interpolation
        voxels = {name: math.prod(self.dataset.case(name).shape) for name in self.cases}
        self.mine = shard_cases(voxels, self.distributed.world_size)[self.distributed.rank]

    @torch.no_grad()
    def run(self, network: nn.Module, panels: int = 0) -> ValidationResult:
        model = TrainedModel(network, self.class_names, 1, self.patch_size, self.normalization, step=0,
                             source=Path("(training)"), target_spacing=self.target_spacing,
                             image_interpolation=self.image_interpolation)  # fmt: skip
        counts = torch.zeros(len(self.class_names), 3, dtype=torch.float64)
        shown: list[tuple[int, SegmentationPanel]] = []
        for name in self.mine:
            case = self.dataset.case(name)
            labels = predict_volume(
                model, case.image_array, overlap=self.config.overlap, mirror=self.config.mirror,
                batch_size=self.config.batch_size, max_memory=int(self.config.max_memory_mb * 2**20),
                scratch=self.scratch, device=self.distributed.device, autocast_dtype=self.autocast_dtype,
                spacing=case.spacing,
            )  # fmt: skip
            reference = np.asarray(case.label_array()[...])
            counts += volume_confusion_counts(labels, reference, len(self.class_names))
            if self.cases.index(name) < panels:
                shown.append((self.cases.index(name), self._panel(case, labels, reference)))
        counts = self.distributed.all_reduce(counts.to(self.distributed.device)).cpu()
        gathered = sorted(
            (pair for part in self.distributed.gather_objects(shown) for pair in part), key=lambda pair: pair[0]
        )
        dice = dice_scores(counts, self.class_names)
        panels_shown = []
        if self.distributed.is_main:
            for index, (_, panel) in enumerate(gathered):
                panel.key = f"val/panel/{index}"
                panels_shown.append(panel)
        return ValidationResult(dice, mean_dice(dice), panels_shown)

    def _panel(self, case, labels: np.ndarray, reference: np.ndarray) -> SegmentationPanel:
        """The z slice with the most labelled voxels (the middle one if none), as the network saw it."""
        foreground = (reference > 0).sum(axis=(1, 2))
        z = int(foreground.argmax()) if foreground.any() else reference.shape[0] // 2
        image = self.normalization(np.asarray(case.image_array[z]))
        caption = f"{case.name} z={z} (whole volume {tuple(case.shape)})"
        return SegmentationPanel("val/panel", image, reference[z], labels[z], self.class_names, caption)
