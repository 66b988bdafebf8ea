"""Patch-based validation on held-out cases: per-class Dice over all ranks, and a few image panels.

The cheaper alternative to whole-volume validation (``volume_validation``), for cases too large to
predict whole every few hundred steps: ``validation.mode = "patch"``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from iunet3d.data import CTDataset, CTNormalization
from iunet3d.infer.dice import confusion_counts, dice_scores, mean_dice
from iunet3d.train.config import ValidationConfig
from iunet3d.train.distributed import Distributed
from iunet3d.train.wandb_logger import SegmentationPanel


@dataclass
class ValidationResult:
    dice: dict[str, float]  #: per foreground class (NaN: absent from labels and predictions)
    dice_mean: float
    panels: list[SegmentationPanel] = field(default_factory=list)  #: the main rank's only

    def metrics(self) -> dict[str, float]:
        """``val/dice_mean`` and ``val/dice/<class>`` for the logger."""
        return {"val/dice_mean": self.dice_mean, **{f"val/dice/{name}": v for name, v in self.dice.items()}}


class PatchValidator:
    """Runs the network over this rank's share of fixed validation patches and reduces the Dice counts.

    Every rank must call ``run`` (the counts are summed across ranks). The network is the unwrapped
    module, not the DDP wrapper: evaluation makes no gradient synchronisation.
    """

    def __init__(
        self,
        dataset: CTDataset,
        cases: list[str],
        patch_size: tuple[int, int, int],
        config: ValidationConfig,
        distributed: Distributed,
        normalization: CTNormalization,
        to_device=lambda image: image,
        autocast=contextlib.nullcontext,
    ):
        """``to_device`` moves an image batch to the network; ``autocast`` is a context factory."""
        from iunet3d.data import ValidationPatches

        self.to_device, self.autocast = to_device, autocast
        self.class_names = list(dataset.class_names)
        self.config, self.distributed = config, distributed
        self.patches = ValidationPatches(
            dataset,
            cases=cases,
            patch_size=patch_size,
            patches_per_case=config.patches_per_case,
            foreground_fraction=config.foreground_fraction,
            rank=distributed.rank,
            world_size=distributed.world_size,
            seed=config.seed,
            normalization=normalization,
        )

    @torch.no_grad()
    def run(self, network: nn.Module, panels: int = 0) -> ValidationResult:
        from iunet3d.data import validation_loader

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
