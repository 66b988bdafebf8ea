"""Whole-volume validation: the held-out cases predicted by sliding window, shared out across ranks.

This is what ``iunet3d predict`` computes (the same Gaussian-weighted windows, ``predict_volume``), so the
Dice on the dashboard is the Dice a user gets from the checkpoint, not a patch-level approximation.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from iunet3d.infer.case_metrics import volume_confusion_counts
from iunet3d.infer.dice import dice_scores, mean_dice
from iunet3d.infer.sharding import shard_cases
from iunet3d.infer.trained_model import TrainedModel, predict_volume
from iunet3d.tracking.case_table import CaseResult, keep_worst_panels
from iunet3d.tracking.error_planes import largest_error_center, three_plane_panel
from iunet3d.train.validator import CASES_KEY, ValidationResult, Validator


class VolumeValidator(Validator):
    """Predicts this rank's share of the held-out cases whole and sums the Dice counts over all ranks.

    Cases are shared out by voxel count (``shard_cases``); a rank with no case contributes zero counts.
    Every case's Dice and volumes are gathered onto the main rank (``ValidationResult.cases``, in case order);
    the ``panels`` worst cases (lowest mean Dice) carry three planes through their largest error.
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
        results: list[CaseResult] = []
        dashboard_seconds = 0.0
        for name in self.mine:
            case = self.dataset.case(name)
            labels = predict_volume(
                model, case.image_array, overlap=self.config.overlap, mirror=self.config.mirror,
                batch_size=self.config.batch_size, max_memory=int(self.config.max_memory_mb * 2**20),
                scratch=self.scratch, device=self.distributed.device, autocast_dtype=self.autocast_dtype,
                spacing=case.spacing,
            )  # fmt: skip
            reference = np.asarray(case.label_array()[...])
            case_counts = volume_confusion_counts(labels, reference, len(self.class_names))
            counts += case_counts
            started = time.perf_counter()
            result = CaseResult.from_counts(name, tuple(case.spacing), case_counts, self.class_names)
            if panels:
                center = largest_error_center(reference, labels, case.spacing)
                result.panel = three_plane_panel(f"{CASES_KEY}/{name}", case.image_array, reference, labels,
                                                 center, case.spacing, self.class_names,
                                                 normalize=self.normalization)  # fmt: skip
            results.append(result)
            dashboard_seconds += time.perf_counter() - started
        counts = self.distributed.all_reduce(counts.to(self.distributed.device)).cpu()
        gathered = self.distributed.gather_objects((keep_worst_panels(results, panels), dashboard_seconds))
        dice = dice_scores(counts, self.class_names)
        if not self.distributed.is_main:
            return ValidationResult(dice, mean_dice(dice))
        order = {name: position for position, name in enumerate(self.cases)}
        cases = keep_worst_panels(sorted((r for part in gathered for r in part[0]), key=lambda r: order[r.case]),
                                  panels)  # fmt: skip
        seconds = max(part[1] for part in gathered)  # ranks make their panels at the same time
        return ValidationResult(dice, mean_dice(dice), cases=cases, dashboard_seconds=seconds)
