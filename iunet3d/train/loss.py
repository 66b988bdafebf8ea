"""Dice + cross-entropy loss (the Dice metric from counted voxels is ``iunet3d.infer.dice``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DiceCELoss(nn.Module):
    """``dice_weight * (1 - soft Dice) + ce_weight * cross-entropy``.

    logits: (B, K, D, H, W) float; target: (B, D, H, W) int64 class values in [0, K).

    The soft Dice is computed per patch over the foreground classes present in the patch's label
    (background excluded, as in nnU-Net) and averaged over them; a patch without foreground adds 0. The
    loss of a batch is the mean of its patches' losses, so a DDP job over several ranks computes exactly
    the gradient of one process on the combined batch. A class absent from a patch gets no Dice term:
    its false positives are left to the cross-entropy, instead of a Dice term that would push a small
    class (a lesion) towards zero everywhere it is absent. ``smooth`` only guards against 0 / 0.
    """

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0, smooth: float = 1e-5):
        super().__init__()
        self.dice_weight, self.ce_weight, self.smooth = dice_weight, ce_weight, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        terms = self.terms(logits, target)
        return self.dice_weight * terms["dice"] + self.ce_weight * terms["ce"]

    def terms(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted terms: ``"dice"`` (1 - soft Dice, mean over patches) and ``"ce"`` (cross-entropy),
        each a scalar tensor (a weight of 0 skips its term's computation: it is then 0)."""
        if logits.dim() != 5 or target.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(f"logits (B, K, D, H, W) and target (B, D, H, W) expected, got "
                             f"{tuple(logits.shape)} and {tuple(target.shape)}")  # fmt: skip
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # softmax and sums in float32 under autocast
        dice_term = ce_term = logits.new_zeros(())
        if self.ce_weight:
            ce_term = F.cross_entropy(logits, target)
        if self.dice_weight:
            probabilities = logits.softmax(dim=1)[:, 1:]
            one_hot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3)[:, 1:].to(probabilities.dtype)
            axes = (2, 3, 4)
            intersection = (probabilities * one_hot).sum(axes)
            total = probabilities.sum(axes) + one_hot.sum(axes)
            dice = (2 * intersection + self.smooth) / (total + self.smooth)  # (B, K - 1)
            present = (one_hot.sum(axes) > 0).to(dice.dtype)
            per_patch = ((1 - dice) * present).sum(1) / present.sum(1).clamp_min(1)  # (B,)
            dice_term = per_patch.mean()
        return {"dice": dice_term, "ce": ce_term}
