"""The invertible steps between resolution levels: split + downsample, and upsample + merge.

Each is one invertible module so that a reversible wrapper can release its input: the split is
never a separate, non-invertible operation that would keep a full-resolution tensor alive.
"""

from __future__ import annotations

import torch
from torch import nn

from iunet3d.models.resampling import InvertibleDownsampling, InvertibleUpsampling
from iunet3d.models.reversible_engine import Reversal, leaf


class SplitAndDownsample(nn.Module):
    """x: (B, C, *S) -> (skip: (B, k, *S), low: (B, m * (C - k), *S / stride)).

    ``skip`` is a copy, not a view of ``x``: a reversible wrapper frees ``x``'s storage.
    """

    def __init__(self, skipped_channels: int, downsampling: InvertibleDownsampling):
        super().__init__()
        self.skipped_channels = skipped_channels
        self.downsampling = downsampling

    #: ``forward`` takes ``reuse_input`` (``InferencePass`` passes it)
    can_reuse_input = True

    def forward(self, x: torch.Tensor, *, reuse_input: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (skip, low). With ``reuse_input`` and gradients off (inference; ``x`` is given up and not
        written afterwards) ``skip`` is a view of ``x`` rather than a copy."""
        k = self.skipped_channels
        if reuse_input and not torch.is_grad_enabled():
            return x[:, :k], self.downsampling(x[:, k:])
        return x[:, :k].clone(memory_format=torch.contiguous_format), self.downsampling(x[:, k:])

    def inverse(self, skip: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return torch.cat([skip, self.downsampling.inverse(low)], dim=1)

    def reverse(self, outputs: list[torch.Tensor]) -> Reversal:
        """outputs: [skip, low]. Input pieces (skip, upsampled low); outputs recomputed as (skip, downsampled
        piece). ``low`` is released before the recomputation."""
        skip = leaf(outputs[0])
        with torch.no_grad():
            rest = leaf(self.downsampling.inverse(outputs[1]))
        outputs.clear()
        return Reversal(inputs=((skip, rest),), outputs=((skip,), (self.downsampling(rest),)))


class UpsampleAndMerge(nn.Module):
    """(skip: (B, k, *S), low: (B, m * d, *S / stride)) -> x: (B, k + d, *S)."""

    def __init__(self, skipped_channels: int, upsampling: InvertibleUpsampling):
        super().__init__()
        self.skipped_channels = skipped_channels
        self.upsampling = upsampling

    def forward(self, skip: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        return torch.cat([skip, self.upsampling(low)], dim=1)

    def inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.skipped_channels
        return x[:, :k].clone(memory_format=torch.contiguous_format), self.upsampling.inverse(x[:, k:])

    def reverse(self, outputs: list[torch.Tensor]) -> Reversal:
        """outputs: [x]. Inputs (skip, low) reconstructed from x (released before the recomputation); output
        recomputed as pieces (skip, upsampled low)."""
        k = self.skipped_channels
        skip = leaf(outputs[0][:, :k].clone())
        with torch.no_grad():
            low = leaf(self.upsampling.inverse(outputs[0][:, k:]))
        outputs.clear()
        return Reversal(inputs=((skip,), (low,)), outputs=((skip, self.upsampling(low)),))
