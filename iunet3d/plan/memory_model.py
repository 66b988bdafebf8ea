"""A measured, linear model of a training configuration's peak memory (bytes), for ``iunet3d plan``.

    peak = sum_i coefficient_i * feature_i(config)

Features (``FEATURES``), each with a physical reason:

* ``constant`` (1): the training process after imports and building (Python, torch, the dataset reader,
  augmentation code; on CUDA the allocator's constant part), and the workers' share that does not depend
  on the config.
* ``workers`` (``data.num_workers``): each spawned loader worker is a full Python process with torch and
  the dataset reader imported (~250 MB RSS on CPU, measured: 1 worker vs 0 at the same config).
* ``parameters`` (the network's parameter count): weights + gradients + AdamW's two moments, all float32:
  16 bytes per parameter (SGD with momentum: 12). This coefficient is FIXED, not fitted: calibration
  networks are small (~1e5-1e6 parameters, a few MB), below the probes' noise, so a fitted value would be
  ill-conditioned and extrapolate badly to the large networks a GPU plan picks; the physics is exact.
* ``activations`` (``batch * patch_voxels * channels``): the feature maps. With the reversible engine a
  step keeps O(1) full-resolution feature maps per level (the current block's input and output, the
  coupling function's intermediates of one block, the input and output convolutions' saved inputs),
  independent of the number of couplings; the levels below full resolution hold the same number of
  values per level (channels x stride product, voxels / stride product) but are split in half at each
  level, so their sum is bounded by a constant times the top level's. On CUDA under bf16 autocast the
  carried tensors are float64 (see ``models.precision``), so this coefficient is device- and
  precision-specific: calibrate on the device and precision of the plan.
* ``classes`` (``batch * patch_voxels * num_classes``): logits, their softmax, the one-hot target and
  the loss's per-voxel terms (Dice + CE) and gradients; with the number of classes fixed by the dataset
  it also absorbs the per-voxel costs that depend on neither channels nor classes (the image and label
  batches, the loader's prefetched batches).

Evidence (CPU, 2 cores, fp32, fused engine, the demo model: 4 levels, strides (1,2,2),(2,2,2),(2,2,2),
block depth 2, 4 classes, 1 worker, dataset batches; peaks are summed RSS of the process tree):

* linear in batch x voxels: 8x32x32 -> 16x64x64 at batch 2, 8 channels (+114,688 batch-voxels):
  +22.8 MB; batch 2 -> 4 at 16x64x64 (+131,072): +25.7 MB, i.e. ~200 B per batch-voxel both ways.
* channels 8 -> 16 at 16x64x64, batch 2: +30.0 MB, of which 7.2 MB parameters: ~22 B per
  batch-voxel-channel (about 5-6 float32 feature maps).
* a worker: 0 vs 1 at the same config: 486.7 vs 741.7 MB, 255 MB per worker.
* depth: architecture [1,1,1,1], [4,4,4,4], [8,8,8,8] at 16x64x64, batch 2, 16 channels: 771.8, 802.9,
  838.3 MB for 0.60M, 2.37M, 4.72M parameters: +17.6 and +15.1 B per added parameter, i.e. the
  parameters' 16 B (weights, gradients, AdamW's moments) and nothing else: activations are flat in depth,
  so there is no depth (or couplings x volume) feature.
* fitted on 7 such probes: 459 MB + 255 MB/worker + 16 B/parameter + 23.4 B/(batch*voxel*channel) +
  4.7 B/(batch*voxel*class), in-sample error <= 0.1%; held-out configs within 1% (see the report).
* a first probe design with batch 1 and tiny patches fitted 130 B/(batch*voxel*channel) and a negative
  per-class term: there PyTorch's CPU convolutions take the im2col path (N*C*D*H <= 20480), whose column
  buffer (per sample, ~27 x C/2 x voxels floats) does not scale like the activations. Calibration probes
  therefore use batch 2 and patches up to 8x the smallest (``calibration_configs``).

The number of levels is not a feature: the calibration keeps the base model's strides, so its effect is
in the coefficients (recalibrate for another level count). Only ``reversible_engine = "fused"`` (and
"memcnn") is flat in depth; ``"none"`` (plain autograd) stores every coupling's activations and is
outside this model.

The coefficients are fitted by least squares (``MemoryModel.fit``) to probe measurements
(``iunet3d.plan.probe``), after subtracting the fixed terms; ``calibrate`` runs a small set of probes
derived from a base config and fits.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

FEATURES = ("constant", "workers", "parameters", "activations", "classes")
#: Coefficients known from physics, not fitted (bytes per unit of the feature).
FIXED = {"parameters": 16.0}
BYTES_PER_PARAMETER = {"adamw": 16.0, "sgd": 12.0}  #: weights + grads + optimizer state, float32

_parameter_counts: dict[str, int] = {}
_class_counts: dict[str, int] = {}


def num_classes_of(config) -> int:
    """The config's class count: ``data.classes`` if set, else the dataset's (``data.dataset``)."""
    if config.data.classes:
        return len(config.data.classes)
    path = config.data.dataset
    if path not in _class_counts:
        from iunet3d.data import open_dataset

        _class_counts[path] = open_dataset(path).num_classes
    return _class_counts[path]


def parameter_count(config, num_classes: int | None = None) -> int:
    """Parameters of ``SegmentationIUNet(1, num_classes, **config.model.network_kwargs())`` (built once per
    model section, on the CPU)."""
    num_classes = num_classes_of(config) if num_classes is None else num_classes
    kwargs = config.model.network_kwargs()
    key = json.dumps([num_classes, kwargs], default=list, sort_keys=True)
    if key not in _parameter_counts:
        from iunet3d.models.segmentation import SegmentationIUNet

        network = SegmentationIUNet(1, num_classes, **kwargs)
        _parameter_counts[key] = sum(p.numel() for p in network.parameters())
    return _parameter_counts[key]


def features(config, num_classes: int | None = None) -> np.ndarray:
    """The feature vector of ``config`` (order ``FEATURES``): [1, workers, parameters, batch * voxels *
    channels, batch * voxels * classes] (voxels = prod(data.patch_size); counts, not bytes)."""
    num_classes = num_classes_of(config) if num_classes is None else num_classes
    data = config.data
    volume = data.batch_size * math.prod(data.patch_size)
    return np.array(
        [
            1.0,
            float(data.num_workers),
            float(parameter_count(config, num_classes)),
            float(volume * config.model.channels),
            float(volume * num_classes),
        ]  # fmt: skip
    )


@dataclass
class MemoryModel:
    """``predict(config) = coefficients . features(config)`` bytes; ``coefficients`` in bytes per feature unit."""

    coefficients: dict[str, float]
    fixed: tuple[str, ...] = ()  #: features whose coefficient was set, not fitted
    device: str = "cpu"
    info: dict = field(default_factory=dict)  #: how it was fitted: probes, residuals...

    @classmethod
    def fit(
        cls,
        configs: Sequence,
        peaks: Sequence[float],
        fixed: dict[str, float] | None = None,
        device: str = "cpu",
        num_classes: int | None = None,
    ) -> MemoryModel:
        """Least squares of ``peaks`` (bytes) on the configs' features, after subtracting the ``fixed``
        terms (default ``FIXED``: 16 bytes per parameter). Features that do not vary over the configs are
        not identifiable: their coefficient is 0 (the constant absorbs them)."""
        fixed = dict(FIXED if fixed is None else fixed)
        matrix = np.stack([features(c, num_classes) for c in configs])
        target = np.asarray(peaks, dtype=float).copy()
        if len(target) != len(matrix):
            raise ValueError(f"MemoryModel.fit: {len(matrix)} configs but {len(target)} peaks")
        for name, value in fixed.items():
            target -= value * matrix[:, FEATURES.index(name)]
        free = [i for i, name in enumerate(FEATURES) if name not in fixed]
        varying = [i for i in free if i == 0 or np.ptp(matrix[:, i]) > 0]
        if len(target) < len(varying):
            raise ValueError(f"MemoryModel.fit: {len(target)} measurements for {len(varying)} coefficients")
        solution, *_ = np.linalg.lstsq(matrix[:, varying], target, rcond=None)
        coefficients = {name: 0.0 for name in FEATURES}
        coefficients.update(fixed)
        coefficients.update({FEATURES[i]: float(value) for i, value in zip(varying, solution, strict=True)})
        model = cls(coefficients, tuple(fixed), device)
        predicted = matrix @ model.vector()
        model.info = {"probes": len(target), "max_abs_error_percent": float(
            np.max(np.abs(predicted - np.asarray(peaks)) / np.asarray(peaks))) * 100}  # fmt: skip
        return model

    def vector(self) -> np.ndarray:
        return np.array([self.coefficients.get(name, 0.0) for name in FEATURES])

    def predict(self, config, num_classes: int | None = None) -> float:
        """Predicted peak memory of training ``config`` on this model's device, in bytes."""
        return float(features(config, num_classes) @ self.vector())

    def to_dict(self) -> dict:
        return {"coefficients": dict(self.coefficients), "fixed": list(self.fixed), "device": self.device,
                "info": dict(self.info)}  # fmt: skip

    @classmethod
    def from_dict(cls, values: dict) -> MemoryModel:
        unknown = set(values.get("coefficients", {})) - set(FEATURES)
        if unknown:
            raise ValueError(f"MemoryModel: unknown features {sorted(unknown)} (expected {FEATURES})")
        return cls(dict(values["coefficients"]), tuple(values.get("fixed", ())), values.get("device", "cpu"),
                   dict(values.get("info", {})))  # fmt: skip

    def describe(self) -> str:
        c = self.coefficients
        return (f"peak = {c['constant'] / 2**20:.0f} MB + {c['workers'] / 2**20:.0f} MB/worker + "
                f"{c['parameters']:.0f} B/parameter + {c['activations']:.1f} B/(batch*voxel*channel) + "
                f"{c['classes']:.1f} B/(batch*voxel*class)  [{self.device}]")  # fmt: skip


# ----- calibration ---------------------------------------------------------------------------------------


def _factors(config) -> tuple[int, int, int]:
    """The model's downsampling factors (z, y, x): patch sizes must be multiples."""
    factors = [1, 1, 1]
    for stride in config.model.resampling_stride:
        for axis in range(3):
            factors[axis] *= stride[axis]
    return tuple(factors)


def _round_up(value: int, multiple: int) -> int:
    return max(multiple, -(-value // multiple) * multiple)


def _with(config, *, patch=None, batch=None, channels=None, architecture=None, workers=None):
    data = dataclasses.replace(
        config.data,
        patch_size=tuple(patch) if patch is not None else config.data.patch_size,
        batch_size=batch if batch is not None else config.data.batch_size,
        num_workers=workers if workers is not None else config.data.num_workers,
    )
    model = dataclasses.replace(
        config.model,
        channels=channels if channels is not None else config.model.channels,
        architecture=tuple(architecture) if architecture is not None else config.model.architecture,
    )
    return dataclasses.replace(config, data=data, model=model)


def calibration_configs(base, channels: int | None = None, min_patch=(8, 32, 32), batch: int = 2) -> list:
    """Probe configs derived from ``base``: its model (strides, levels, block depth, engine), classes,
    workers and precision, with small patches (``min_patch`` rounded up to the downsampling factors) and a
    small network (``channels``, default min(base's, 8)), varying each feature independently around a
    reference of 8x the smallest patch's voxels: patch depth, then area; batch (x2), channels (x2),
    couplings per level (x2), and workers (0 vs the base's). Batch ``batch`` and the reference volume keep
    the activations well above the probes' noise (~5 MB), and channels are varied at that volume:
    on CPU, batch-1 probes of tiny patches take PyTorch's im2col convolution path, whose buffer does not
    scale like the activations, and a fit on them extrapolated 5x wrong. ~40-60 s per probe on a 2-core CPU
    under load (about 7 probes)."""
    factors = _factors(base)
    small = tuple(_round_up(m, f) for m, f in zip(min_patch, factors, strict=True))
    deep = (_round_up(small[0] * 2, factors[0]), *small[1:])
    reference = (deep[0], _round_up(small[1] * 2, factors[1]), _round_up(small[2] * 2, factors[2]))
    c0 = channels if channels is not None else min(base.model.channels, 8)
    arch = tuple(max(1, a) for a in base.model.architecture)
    workers = base.data.num_workers
    configs = [
        _with(base, patch=small, batch=batch, channels=c0, architecture=arch),
        _with(base, patch=deep, batch=batch, channels=c0, architecture=arch),
        _with(base, patch=reference, batch=batch, channels=c0, architecture=arch),
        _with(base, patch=reference, batch=2 * batch, channels=c0, architecture=arch),
        _with(base, patch=reference, batch=batch, channels=2 * c0, architecture=arch),
        _with(base, patch=reference, batch=batch, channels=c0, architecture=tuple(2 * a for a in arch)),
    ]
    if workers > 0:
        configs.append(_with(base, patch=reference, batch=batch, channels=c0, architecture=arch, workers=0))
    return configs


def calibrate(
    base_config,
    device: str = "cpu",
    configs: Sequence | None = None,
    steps: int = 2,
    use_dataset: bool = True,
    optimizer: str = "adamw",
    progress: Callable[[str], None] | None = None,
) -> tuple[MemoryModel, list]:
    """Probe ``configs`` (default ``calibration_configs(base_config)``) on ``device``, each in a fresh process,
    and fit a ``MemoryModel``. Returns (model, [(config, Measurement)])."""
    from iunet3d.plan.probe import describe, measure_training

    configs = list(calibration_configs(base_config) if configs is None else configs)
    measured = []
    for config in configs:
        measurement = measure_training(config, device, steps=steps, optimizer=optimizer, use_dataset=use_dataset)
        measured.append((config, measurement))
        if progress is not None:
            progress(f"{describe(config, device)}: peak {measurement.peak_bytes / 2**20:.0f} MB, "
                     f"{measurement.step_seconds:.2f} s/step")  # fmt: skip
    num_classes = measured[0][1].num_classes
    model = MemoryModel.fit([c for c, _ in measured], [m.peak_bytes for _, m in measured],
                            fixed={"parameters": BYTES_PER_PARAMETER[optimizer]}, device=device,
                            num_classes=num_classes)  # fmt: skip
    return model, measured


@dataclass
class ValidationRow:
    name: str
    predicted_bytes: float
    measured_bytes: float

    @property
    def error_percent(self) -> float:
        return 100 * (self.predicted_bytes - self.measured_bytes) / self.measured_bytes


def validate(model: MemoryModel, measured: Sequence, num_classes: int | None = None) -> list[ValidationRow]:
    """Predicted vs measured peak for each (config, Measurement) in ``measured`` (held out from the fit)."""
    from iunet3d.plan.probe import describe

    return [ValidationRow(describe(config, model.device), model.predict(config, num_classes or m.num_classes),
                          float(m.peak_bytes)) for config, m in measured]  # fmt: skip


def holdout(fit_on: Sequence, test_on: Sequence, **fit_options) -> tuple[MemoryModel, list[ValidationRow]]:
    """Fit on the (config, Measurement) pairs ``fit_on``, predict ``test_on``: (model, rows)."""
    num_classes = fit_on[0][1].num_classes
    model = MemoryModel.fit([c for c, _ in fit_on], [m.peak_bytes for _, m in fit_on], num_classes=num_classes,
                            device=fit_on[0][1].device, **fit_options)  # fmt: skip
    return model, validate(model, test_on, num_classes)


def format_validation(rows: Sequence[ValidationRow]) -> str:
    """A Markdown table: config, predicted MB, measured MB, error %."""
    lines = ["| config | predicted MB | measured MB | error |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.name} | {row.predicted_bytes / 2**20:.0f} | {row.measured_bytes / 2**20:.0f} | "
                     f"{row.error_percent:+.1f}% |")  # fmt: skip
    return "\n".join(lines)
