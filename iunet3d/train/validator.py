"""What every validator shares: the held-out cases, when validation is due, autocast, and the result."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn

from iunet3d.data import CTDataset, CTNormalization
from iunet3d.distributed import Distributed
from iunet3d.tracking.case_table import CaseResult, CaseTable, ClassSummaryTable
from iunet3d.tracking.wandb_run import SegmentationPanel
from iunet3d.train.config import ValidationConfig

CASES_KEY, CLASSES_KEY = "val/cases", "val/classes"  #: the W&B keys of the case table and the per-class summary


@dataclass
class ValidationResult:
    dice: dict[str, float]  #: per foreground class (NaN: absent from labels and predictions)
    dice_mean: float
    panels: list[SegmentationPanel] = field(default_factory=list)  #: the main rank's only (patch validation)
    cases: list[CaseResult] = field(default_factory=list)  #: per held-out case, the main rank's only (whole volume)
    dashboard_seconds: float = 0.0  #: spent making the cases' panels (slowest rank)

    def metrics(self) -> dict[str, float]:
        """``val/dice_mean`` and ``val/dice/<class>`` for the logger."""
        return {"val/dice_mean": self.dice_mean, **{f"val/dice/{name}": v for name, v in self.dice.items()}}

    def tables(self, class_names: list[str]) -> list:
        """The case table and its per-class summary (none without per-case results)."""
        if not self.cases:
            return []
        return [CaseTable(CASES_KEY, class_names, self.cases), ClassSummaryTable(CLASSES_KEY, class_names, self.cases)]


class Validator(ABC):
    """Validation on the held-out ``cases`` of ``dataset``, every ``config.every`` steps and at the last.

    Every rank must call ``run`` (the Dice counts are summed across ranks); ``network`` is the unwrapped
    module, not the DDP wrapper: evaluation makes no gradient synchronisation. ``autocast_dtype`` is the
    training's (None: full precision).
    """

    def __init__(
        self,
        dataset: CTDataset,
        cases: list[str],
        patch_size: tuple[int, int, int],
        config: ValidationConfig,
        distributed: Distributed,
        normalization: CTNormalization,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.dataset, self.cases = dataset, list(cases)
        self.class_names = list(dataset.class_names)
        self.patch_size, self.config, self.distributed = tuple(patch_size), config, distributed
        self.normalization, self.autocast_dtype = normalization, autocast_dtype

    def should_validate(self, step: int, last_step: int) -> bool:
        """Due every ``config.every`` steps (0: only at the end) and at ``last_step``."""
        every = self.config.every
        return bool(every and step % every == 0) or step == last_step

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.distributed.device.type, dtype=self.autocast_dtype)

    @abstractmethod
    def run(self, network: nn.Module, panels: int = 0) -> ValidationResult:
        """Per-class Dice over all ranks, and up to ``panels`` image panels on the main rank."""
