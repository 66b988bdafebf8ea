"""Automatic padding to a multiple of the total downsampling factor, and cropping back."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

PADDING_MODES = ("constant", "reflect", "replicate", "circular", None)


def padding_amounts(shape: Sequence[int], factors: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) per spatial axis so each size becomes a multiple of its factor (split evenly)."""
    amounts = []
    for size, factor in zip(shape, factors, strict=True):
        total = -size % factor
        amounts.append((total // 2, total - total // 2))
    return amounts


def pad_to_multiple(
    x: torch.Tensor, factors: Sequence[int], mode: str | None, value: float
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """x: (B, C, *S) -> (padded x, amounts). Returns ``x`` itself (no copy) when nothing is needed."""
    spatial = x.shape[2:]
    amounts = padding_amounts(spatial, factors)
    if not any(before or after for before, after in amounts):
        return x, amounts
    if mode is None:
        raise ValueError(
            f"input spatial shape {tuple(spatial)} is not divisible by the total downsampling factors "
            f"{tuple(factors)} and padding_mode=None; pad the input or set a padding_mode"
        )
    flat = [p for before_after in reversed(amounts) for p in before_after]  # F.pad: last axis first
    if mode == "constant":
        return F.pad(x, flat, mode="constant", value=value), amounts
    too_large = {"reflect": lambda pad, size: pad >= size, "circular": lambda pad, size: pad > size}.get(mode)
    if too_large and any(too_large(max(ba), s) for ba, s in zip(amounts, spatial, strict=True)):
        raise ValueError(
            f"padding_mode={mode!r} cannot pad spatial shape {tuple(spatial)} to multiples of {tuple(factors)}: "
            "the padding exceeds the size; use 'constant' or 'replicate'"
        )
    return F.pad(x, flat, mode=mode), amounts


def crop_padding(x: torch.Tensor, amounts: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Undo ``pad_to_multiple``: x (B, C, *S_padded) -> view (B, C, *S)."""
    if not any(before or after for before, after in amounts):
        return x
    index = [slice(None), slice(None)] + [
        slice(before, x.shape[2 + i] - after) for i, (before, after) in enumerate(amounts)
    ]
    return x[tuple(index)]
