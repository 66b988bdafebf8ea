"""Argument normalisation and channel arithmetic of an iUNet, and its ``print_layout`` text."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

SLICE_FACTORS = {"double": 2, "constant": 1}


def normalise_architecture(architecture: Sequence[int]) -> tuple[int, ...]:
    """Couplings per level, each >= 1."""
    if isinstance(architecture, int) or not isinstance(architecture, Sequence) or len(architecture) == 0:
        raise ValueError(f"architecture must be a non-empty sequence of positive ints, got {architecture!r}")
    for count in architecture:
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(
                f"architecture entries are coupling layers per level and must be ints >= 1, got {architecture!r}"
            )
    return tuple(architecture)


def _stride_tuple(stride: int | Sequence[int], dim: int, where: str) -> tuple[int, ...]:
    if isinstance(stride, int) and not isinstance(stride, bool):
        stride = (stride,) * dim
    if not isinstance(stride, Sequence) or len(stride) != dim:
        raise ValueError(f"resampling_stride{where} must be an int or a tuple of length dim={dim}, got {stride!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in stride):
        raise ValueError(f"resampling_stride{where} entries must be ints >= 1, got {stride!r}")
    if math.prod(stride) == 1:
        raise ValueError(f"resampling_stride{where} must be > 1 along at least one axis, got {stride!r}")
    return tuple(stride)


def normalise_strides(resampling_stride, dim: int, levels: int) -> list[tuple[int, ...]]:
    """One per-axis stride tuple per level transition (``levels - 1`` of them).

    ``resampling_stride``: an int (all axes, all levels), a tuple of length ``dim`` (all levels), or
    a list of ``levels - 1`` ints/tuples (per level), e.g. ``[(1, 2, 2), (1, 2, 2), 2]``.
    """
    if isinstance(resampling_stride, list):
        if len(resampling_stride) != levels - 1:
            raise ValueError(
                f"resampling_stride as a list needs one entry per level transition "
                f"(len(architecture) - 1 = {levels - 1}), got {len(resampling_stride)}"
            )
        return [_stride_tuple(s, dim, f"[{i}]") for i, s in enumerate(resampling_stride)]
    return [_stride_tuple(resampling_stride, dim, "")] * (levels - 1)


@dataclass(frozen=True)
class ChannelPlan:
    """Channels per level: ``channels[i]`` (C_i), ``skipped[i]`` (k_i), ``down[i]`` (d_i)."""

    channels: tuple[int, ...]
    skipped: tuple[int, ...]
    down: tuple[int, ...]


def plan_channels(in_channels: int, strides: Sequence[Sequence[int]], slice_mode: str) -> ChannelPlan:
    """``k_i = max(1, floor(C_i (m_i - f) / m_i))``, ``d_i = C_i - k_i``, ``C_{i+1} = m_i d_i``."""
    if slice_mode not in SLICE_FACTORS:
        raise ValueError(f"slice_mode must be one of {tuple(SLICE_FACTORS)}, got {slice_mode!r}")
    f = SLICE_FACTORS[slice_mode]
    channels, skipped, down = [in_channels], [], []
    for stride in strides:
        c, m = channels[-1], math.prod(stride)
        k = max(1, (c * (m - f)) // m)
        if c - k < 1:
            raise ValueError(
                f"in_channels={in_channels} is too few: level {len(channels) - 1} has {c} channel(s), "
                f"which cannot be split into skipped and downsampled parts"
            )
        skipped.append(k)
        down.append(c - k)
        channels.append(m * (c - k))
    return ChannelPlan(tuple(channels), tuple(skipped), tuple(down))


def format_layout(plan: ChannelPlan, architecture: Sequence[int]) -> str:
    """The seed library's ``print_layout`` text: one row per level, the encoder left, decoder right."""
    levels = len(architecture)
    lefts, rights, splits = [], [], []
    for i in range(levels):
        blocks = "-".join([str(plan.channels[i])] * architecture[i])
        split = f"({plan.skipped[i]}/{plan.down[i]})" if i < levels - 1 else ""
        lefts.append(blocks + "-" + split)
        rights.append(split + "-" + blocks)
        splits.append(split)
    rows = [lefts[-1] + rights[-1]]
    for i in reversed(range(levels - 1)):
        gap = "-" * max(len(rows[0]) - len(splits[i]), 4)
        rows.insert(0, lefts[i] + gap + rights[i])
    width = len(rows[0])
    centred = [rows[0]]
    for row in rows[1:]:
        pad = width - len(row)
        centred.append("-" * (pad // 2) + row + "-" * (pad - pad // 2))
    return "\n".join(centred)
