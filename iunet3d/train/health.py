"""Numerical health of the reversible network during training: its reconstruction error.

Invertible blocks can lose their numerical invertibility while they train (Behrmann et al., "Understanding
and Mitigating Exploding Inverses in Invertible Neural Networks", AISTATS 2021); reversible backprop then
reconstructs wrong activations and its gradients are wrong without any error being raised. The monitor
measures ``inverse(forward(x))`` on the current training batch, under the training autocast, and warns
once when it exceeds the threshold.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from iunet3d.distributed import Distributed
from iunet3d.models.segmentation import SegmentationIUNet


class InvertibilityMonitor:
    """Checks ``SegmentationIUNet.reconstruction_error`` every ``every`` steps (0: when validating, -1:
    never), as the maximum over ranks (each on its own batch), and warns once above ``threshold``."""

    def __init__(self, every: int, threshold: float, distributed: Distributed,
                 autocast: Callable[[], AbstractContextManager]):  # fmt: skip
        self.every, self.threshold = every, threshold
        self.distributed, self.autocast = distributed, autocast
        self.warned = False
        self.last: dict[str, float] = {}

    def due(self, step: int, validating: bool) -> bool:
        if self.every < 0:
            return False
        return validating if self.every == 0 else step % self.every == 0

    def check(self, network: SegmentationIUNet, image: torch.Tensor, step: int) -> dict[str, float]:
        """``health/reconstruction_error`` (and per level) of ``network`` at ``image`` (B, 1, D, H, W)."""
        with self.autocast():
            error = network.reconstruction_error(image)
        metrics = error.metrics()
        values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=image.device)
        values = self.distributed.all_reduce(values, op="max")
        self.last = dict(zip(metrics, values.tolist(), strict=True))
        total = self.last["health/reconstruction_error"]
        if not self.warned and not total <= self.threshold:
            self.warned = True
            if self.distributed.is_main:
                warnings.warn(
                    f"health/reconstruction_error {total:.2e} at step {step} exceeds train.health_threshold "
                    f"{self.threshold:.0e}: the iUNet no longer inverts itself accurately, so its reversible "
                    "gradients are wrong by about as much. Lower train.lr or train.clip_grad_norm, or train with "
                    "model.reversible_engine = 'none' (plain autograd: exact gradients, memory grows with depth)",
                    stacklevel=2,
                )
        return self.last
