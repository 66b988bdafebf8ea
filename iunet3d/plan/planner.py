"""Choosing a training configuration from a dataset and a memory budget (``iunet3d plan``).

What is chosen, in this order:

1. the target spacing (``"auto"``'s rule, resolved to numbers) and the median case shape at it;
2. per candidate patch volume, the patch and the strides per level (``topology.patch_topology``: equal
   millimetres per axis, clipped to the median shape, thick axes pooled later, bottleneck >= 4 voxels);
3. the largest patch whose predicted peak memory (a fitted ``MemoryModel``) stays within
   ``BUDGET_FRACTION`` of the budget at ``MIN_BATCH`` patches per device; when the patch already covers
   the median case, the batch grows instead.

Channels and couplings per level are compute choices: with reversible backprop, activation memory does not
grow with depth, so depth (``--depth``) costs time, not memory (parameters and optimizer state grow, by
16 bytes per parameter; the model counts them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from iunet3d.data.dataset import CTDataset, open_dataset
from iunet3d.data.resampling import auto_target_spacing, dataset_target_spacing
from iunet3d.data.statistics import spacing_statistics
from iunet3d.plan.topology import MIN_BOTTLENECK, patch_topology, total_stride
from iunet3d.train.config import DataConfig, ModelConfig, TrainConfig, TrainingConfig

MIN_BATCH = 2  #: patches per device: fewer make batch statistics and the Dice loss noisy
BUDGET_FRACTION = 0.9  #: plan to this share of the budget: the model's error (+-10 %) keeps the run inside it
GROWTH = 1.05  #: step between candidate patch volumes
MIN_PATCH_VOXELS = 16**3  #: the smallest plan considered (a few voxels of bottleneck per axis)
MAX_PATCH_VOXELS = 512**3


@dataclass(frozen=True)
class Plan:
    """A planned training configuration and why each choice was made."""

    config: TrainingConfig
    budget_bytes: int
    predicted_peak_bytes: float
    median_shape: tuple[int, int, int]  #: median case shape at the target spacing (voxels)
    reasons: dict[str, str] = field(default_factory=dict)  #: "section.key" -> why

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.config.data.patch_size)

    @property
    def batch_size(self) -> int:
        return self.config.data.batch_size

    @property
    def architecture(self) -> tuple[int, ...]:
        return tuple(self.config.model.architecture)


def median_target_shape(dataset: CTDataset, target: Sequence[float]) -> tuple[int, int, int]:
    """The median case shape (z, y, x voxels) after resampling every case to ``target``."""
    entries = dataset.info.get("cases", [])
    if not entries:
        raise ValueError(f"{dataset.path}: no cases to plan for")
    shapes = [[n * s / t for n, s, t in zip(e["shape"], e["spacing"], target, strict=True)] for e in entries]
    return tuple(int(v) for v in np.median(np.asarray(shapes), axis=0))


def resolved_target_spacing(dataset: CTDataset) -> tuple[float, float, float]:
    """``"auto"``'s spacing for ``dataset`` as numbers (the cases' common spacing when it resolves natively)."""
    spacings = [entry["spacing"] for entry in dataset.info.get("cases", [])]
    return dataset_target_spacing(dataset, "auto") or auto_target_spacing(spacing_statistics(spacings))


def base_config(dataset: CTDataset, device: str = "cpu", precision: str = "fp32", depth: int | None = None,
                channels: int | None = None) -> TrainingConfig:  # fmt: skip
    """The config a plan starts from: every choice but the patch, strides and batch (a one-level network on
    8x8x8 patches). Defaults: on CUDA 32 channels, 4 couplings per level, 6 loader workers per GPU; on the
    CPU 16 channels, 2 couplings, 1 worker, channels-last (faster CPU convolutions), float32."""
    if device not in ("cpu", "cuda") or precision not in ("bf16", "fp32"):
        raise ValueError(f"plan: expected --device cpu|cuda and --precision bf16|fp32, got {device} and {precision}")
    on_gpu = device == "cuda"
    depth = depth if depth is not None else (4 if on_gpu else 2)
    channels = channels if channels is not None else (32 if on_gpu else 16)
    if depth < 1 or channels < 1:
        raise ValueError(f"--depth and --channels: expected positive integers, got {depth} and {channels}")
    return TrainingConfig(
        data=DataConfig(
            dataset=str(dataset.path.resolve()), patch_size=(8, 8, 8), batch_size=MIN_BATCH,
            num_workers=6 if on_gpu else 1, target_spacing=resolved_target_spacing(dataset),
            classes=tuple(dataset.class_names),
        ),
        model=ModelConfig(channels=channels, architecture=(depth,), resampling_stride=()),
        train=TrainConfig(precision=precision if on_gpu else "fp32", device=device, channels_last=not on_gpu),
    )  # fmt: skip


def calibration_base(dataset: CTDataset, device: str = "cpu", precision: str = "fp32", depth: int | None = None,
                     channels: int | None = None) -> TrainingConfig:  # fmt: skip
    """``base_config`` with the levels and strides of a patch covering the median case: the network the
    memory model is calibrated on (with small patches) has as many levels as the largest plan can have, so
    plans with fewer levels are, if anything, over-estimated."""
    base = base_config(dataset, device, precision, depth, channels)
    target = base.data.target_spacing
    shape = median_target_shape(dataset, target)
    _, strides = patch_topology(target, shape, math.prod(shape))
    depth = base.model.architecture[0]
    model = replace(base.model, architecture=(depth,) * (len(strides) + 1), resampling_stride=tuple(strides))
    return replace(base, model=model)


def _fill(config: TrainingConfig, peak: float, shape: Sequence[int], limit: float,
          predict: Callable[[TrainingConfig], float]) -> tuple[TrainingConfig, float]:  # fmt: skip
    """Grow the patch one axis at a time by one multiple of its downsampling (the axis covering the fewest
    millimetres first, never beyond the median case) while the prediction stays within ``limit``: the
    multiples are coarse (16 voxels in-plane for four halvings), so the equal-millimetre patch alone can
    leave a fifth of the budget unused."""
    factor = total_stride(config.model.resampling_stride)
    spacing = config.data.target_spacing
    grown = True
    while grown:
        grown = False
        patch = config.data.patch_size
        for axis in sorted(range(3), key=lambda a: patch[a] * spacing[a]):
            larger = tuple(n + factor[a] if a == axis else n for a, n in enumerate(patch))
            if larger[axis] > shape[axis]:
                continue
            candidate = replace(config, data=replace(config.data, patch_size=larger))
            candidate_peak = float(predict(candidate))
            if candidate_peak <= limit:
                config, peak, grown = candidate, candidate_peak, True
                break
    return config, peak


def _describe(values: Sequence[float]) -> str:
    return " x ".join(f"{v:g}" for v in values)


def plan_training(
    dataset: CTDataset | str,
    budget_bytes: float,
    device: str = "cpu",
    precision: str = "fp32",
    gpus: int = 1,
    model=None,
    depth: int | None = None,
    channels: int | None = None,
) -> Plan:
    """The configuration for ``dataset`` whose predicted peak memory per device uses the most of
    ``budget_bytes`` within ``BUDGET_FRACTION``; ``ValueError`` naming the smallest budget that would work
    when even the smallest plan does not fit.

    ``model``: a fitted ``MemoryModel`` (or any callable config -> bytes); None: calibrate one on
    ``device`` first (``memory_model.calibrate``: a few short probe runs, about two minutes on a CPU).
    """
    dataset = open_dataset(dataset)
    if not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"--gpus: expected a positive integer, got {gpus!r}")
    base = base_config(dataset, device, precision, depth, channels)
    target, on_gpu = base.data.target_spacing, device == "cuda"
    shape = median_target_shape(dataset, target)
    depth, channels, workers = base.model.architecture[0], base.model.channels, base.data.num_workers
    if model is None:
        from iunet3d.plan.memory_model import calibrate

        model, _ = calibrate(calibration_base(dataset, device, precision, depth, channels), device)
    predict: Callable[[TrainingConfig], float] = model.predict if hasattr(model, "predict") else model

    def candidate(voxels: float, batch: int) -> tuple[TrainingConfig, float]:
        patch, strides = patch_topology(target, shape, voxels)
        model = replace(base.model, architecture=(depth,) * (len(strides) + 1), resampling_stride=tuple(strides))
        config = replace(base, data=replace(base.data, patch_size=patch, batch_size=batch), model=model)
        return config, float(predict(config))

    limit = budget_bytes * BUDGET_FRACTION
    smallest, smallest_peak = candidate(MIN_PATCH_VOXELS, MIN_BATCH)
    if smallest_peak > limit:
        needed = math.ceil(smallest_peak / BUDGET_FRACTION / 2**30 * 100) / 100  # GB, rounded up
        raise ValueError(
            f"--memory {budget_bytes / 2**30:.2f} GB is below what the smallest plan needs: patch "
            f"{_describe(smallest.data.patch_size)} x batch {MIN_BATCH} is predicted to peak at "
            f"{smallest_peak / 2**30:.2f} GB; give at least {needed:.2f} GB"
        )
    best, best_peak, voxels = smallest, smallest_peak, float(MIN_PATCH_VOXELS)
    whole = math.prod(shape)
    while voxels < min(whole, MAX_PATCH_VOXELS):
        voxels = min(voxels * GROWTH, whole)
        config, peak = candidate(voxels, MIN_BATCH)
        if peak > limit:
            break
        if math.prod(config.data.patch_size) >= math.prod(best.data.patch_size):
            best, best_peak = config, peak
    best, best_peak = _fill(best, best_peak, shape, limit, predict)
    batch_reason = f"{MIN_BATCH} per device: the patch takes the rest of the budget"
    if math.prod(best.data.patch_size) >= 0.95 * math.prod(patch_topology(target, shape, whole)[0]):
        while True:  # the patch covers the median case: more patches per step instead
            config = replace(best, data=replace(best.data, batch_size=best.data.batch_size + 1))
            peak = float(predict(config))
            if peak > limit:
                break
            best, best_peak = config, peak
        batch_reason = "the patch covers the median case, so the batch takes the rest of the budget"
    data, model = best.data, best.model
    factor = total_stride(model.resampling_stride)
    reasons = {
        "data.target_spacing": f'"auto"\'s rule: median spacing per axis (thick axis: 10th percentile) = '
        f"{_describe(target)} mm",
        "data.patch_size": f"largest within {BUDGET_FRACTION:.0%} of the budget; about equal mm per axis "
        f"({_describe(p * t for p, t in zip(data.patch_size, target, strict=True))} mm), within the median "
        f"case {_describe(shape)}, divisible by the downsampling {_describe(factor)}",
        "data.batch_size": batch_reason + (f" ({data.batch_size * gpus} per step on {gpus} GPUs)" if gpus > 1 else ""),
        "data.num_workers": f"{workers} loader processes per {'GPU' if on_gpu else 'process'}",
        "model.channels": f"{channels} on {device}: compute, not memory, limits it",
        "model.architecture": f"{depth} couplings per level (--depth): reversible backprop keeps activation "
        "memory flat in depth, so depth costs step time, not memory",
        "model.resampling_stride": "an axis is halved while its spacing is within 2x of the finest and the "
        f"bottleneck keeps >= {MIN_BOTTLENECK} voxels ({len(model.resampling_stride) + 1} levels)",
        "train.precision": "bf16 autocast on CUDA" if on_gpu and precision == "bf16" else "float32",
    }
    return Plan(best, int(budget_bytes), best_peak, shape, reasons)
