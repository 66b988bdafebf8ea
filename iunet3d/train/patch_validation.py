"""Patch-based validation on held-out cases: per-class Dice over all ranks, and a few image panels.

The cheaper alternative to whole-volume validation (``volume_validation``), for cases too large to
predict whole every few hundred steps: ``validation.mode = "patch"``.
"""

from __future__ import annotations

import torch
from torch import nn

from iunet3d.infer.dice import confusion_counts, dice_scores, mean_dice
from iunet3d.patches import ValidationPatches, validation_loader
from iunet3d.tracking.wandb_run import SegmentationPanel
from iunet3d.train.validator import ValidationResult, Validator


class PatchValidator(Validator):
    """Runs the network over this rank's share of fixed validation patches and reduces the Dice counts."""

    def __init__(self, *args, to_device=lambda image: image, target_spacing=None, image_interpolation="linear",
                 label_interpolation="nearest", **kwargs):  # fmt: skip
        """``Validator``'s arguments; ``to_device`` moves an image batch to the network; the patches are taken
        at ``target_spacing`` (None: the cases' own voxels) with these interpolations."""
        super().__init__(*args, **kwargs)
        self.to_device = to_device
        config, distributed = self.config, self.distributed
        self.patches = ValidationPatches(
            self.dataset,
            cases=self.cases,
            patch_size=self.patch_size,
            patches_per_case=config.patches_per_case,
            foreground_fraction=config.foreground_fraction,
            rank=distributed.rank,
            world_size=distributed.world_size,
            seed=config.seed,
            normalization=self.normalization,
            target_spacing="native" if target_spacing is None else target_spacing,
            image_interpolation=image_interpolation,
            label_interpolation=label_interpolation,
        )

    @torch.no_grad()
    def run(self, network: nn.Module, panels: int = 0) -> ValidationResult:
        was_training = network.training
        network.eval()
        counts = torch.zeros(len(self.class_names), 3, dtype=torch.float64)
        shown: list[SegmentationPanel] = []
        try:
            loader = validation_loader(self.patches, self.config.batch_size, num_workers=0)
            for batch in loader:
                with self.autocast():
                    logits = network(self.to_device(batch["image"]))
                prediction = logits.argmax(dim=1).cpu()
                counts += confusion_counts(prediction, batch["label"], len(self.class_names))
                if self.distributed.is_main and len(shown) < panels:
                    shown += self._panels(batch, prediction, panels - len(shown))
        finally:
            network.train(was_training)
        counts = self.distributed.all_reduce(counts.to(self.distributed.device)).cpu()
        dice = dice_scores(counts, self.class_names)
        return ValidationResult(dice, mean_dice(dice), shown)

    def _panels(self, batch: dict, prediction: torch.Tensor, count: int) -> list[SegmentationPanel]:
        """The middle z slice of the first ``count`` patches of the batch (foreground-centred patches have
        their class there)."""
        panels = []
        for i in range(min(count, len(batch["case"]))):
            location = batch["location"][i].tolist()
            z = location[0] + batch["label"].shape[1] // 2
            panels.append(
                SegmentationPanel.middle_slice(
                    f"val/panel/{len(panels)}",
                    batch["image"][i, 0].float().numpy(),
                    batch["label"][i].numpy(),
                    prediction[i].numpy(),
                    self.class_names,
                    caption=f"{batch['case'][i]} z={z} (patch at {location})",
                )
            )
        return panels
