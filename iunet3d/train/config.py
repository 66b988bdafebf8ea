"""The training run's configuration: one typed dataclass per component, one TOML section each.

Every component receives its own section, never the whole config. Load with ``load_training_config``
(a TOML file from ``configs/`` plus ``--set section.key=value`` overrides).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from iunet3d.data.resampling import check_interpolation, check_target_spacing
from iunet3d.infer.windows import check_overlap
from iunet3d.patches.augmentation import AugmentationConfig
from iunet3d.tracking.wandb_run import WandbConfig
from iunet3d.train.toml_config import ConfigError, from_dict, load_config, to_dict

PRECISIONS = ("bf16", "fp16", "fp32")
SCHEDULES = ("cosine", "poly", "constant")
DEVICES = ("auto", "cpu", "cuda")
NORMS = ("group", "instance", "none")
ENGINES = ("fused", "memcnn", "none")  #: SegmentationIUNet's reversible_engine (kept torch-free here)


def _positive(section: str, **values) -> None:
    for key, value in values.items():
        if value < 1:
            raise ValueError(f"{section}.{key}: expected a positive integer, got {value!r}")


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/iunet3d"  #: run directory: config, checkpoints, W&B files (shared by all nodes)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = ""  #: path to a dataset written by ``iunet3d convert`` or ``iunet3d synth``
    patch_size: tuple[int, int, int] = (32, 128, 128)  #: z, y, x voxels
    batch_size: int = 2  #: patches per rank per micro-step
    num_workers: int = 2  #: DataLoader worker processes per rank (0: load in the training process)
    validation_cases: int | float = 0.2  #: held-out cases: a count, or a fraction of the dataset
    split_seed: int = 0  #: which cases are held out
    foreground_fraction: float = 0.33  #: share of patches centred on a voxel of a present class
    class_weights: tuple[float, ...] | None = None  #: per foreground class (in order): odds of centring on it
    augment: bool = True  #: apply the [augmentation] section (False: intensity normalisation only)
    window: tuple[float, float] | None = None  #: fixed HU window onto [-1, 1]; default: dataset statistics
    classes: tuple[str, ...] | None = None  #: expected class names, background first (checked against the dataset)
    #: voxel size (z, y, x mm) patch_size counts and the network works at: "auto" (from the dataset's spacings; the
    #: cases' own voxels when they all share it), "native" (the cases' own voxels) or [z, y, x]
    target_spacing: str | tuple[float, float, float] = "auto"
    image_interpolation: str = "linear"  #: resampling the image onto the target spacing: linear or cubic
    label_interpolation: str = "nearest"  #: resampling labels: nearest, or linear (per-class masks, the largest wins)

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ValueError("data.dataset: required (a dataset directory from `iunet3d convert` or `iunet3d synth`)")
        _positive("data", batch_size=self.batch_size, **{f"patch_size[{i}]": s for i, s in enumerate(self.patch_size)})
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers: expected an integer >= 0, got {self.num_workers}")
        if not 0 <= self.foreground_fraction <= 1:
            raise ValueError(f"data.foreground_fraction: expected a number in [0, 1], got {self.foreground_fraction}")
        check_target_spacing(self.target_spacing, "data.target_spacing")
        check_interpolation(self.image_interpolation, "data.image_interpolation", ("linear", "cubic"))
        check_interpolation(self.label_interpolation, "data.label_interpolation", ("nearest", "linear"))
        if self.class_weights is not None and (min(self.class_weights, default=0) < 0 or sum(self.class_weights) <= 0):
            raise ValueError(f"data.class_weights: expected weights >= 0, not all 0, got {list(self.class_weights)}")

    def class_probabilities(self, num_classes: int) -> dict[int, float] | None:
        """``class_weights`` as the patch sampler takes them: {class value: weight} for values 1..K-1."""
        if self.class_weights is None:
            return None
        if len(self.class_weights) != num_classes - 1:
            raise ValueError(
                f"data.class_weights: expected one weight per foreground class ({num_classes - 1}), "
                f"got {len(self.class_weights)}"
            )
        return {value: weight for value, weight in enumerate(self.class_weights, start=1)}


@dataclass(frozen=True)
class ModelConfig:
    channels: int = 16  #: feature channels at full resolution (the iUNet's in_channels)
    architecture: tuple[int, ...] = (2, 2, 2)  #: invertible couplings per level
    resampling_stride: tuple[tuple[int, int, int], ...] = ((1, 2, 2), (2, 2, 2))  #: one z, y, x stride per transition
    block_depth: int = 2  #: convolutions per coupling function
    kernel_size: int = 3
    norm: str = "group"
    num_groups: int = 8
    channel_mixing_freq: int = -1  #: -1: one learnable channel mixing per level, 0: none
    #: reversible backprop: fused (one recomputation per block, bf16 inside the chain), memcnn (the reference:
    #: three evaluations per coupling, float32 only), none (plain autograd: stores activations, memory grows with depth)
    reversible_engine: str = "fused"

    def __post_init__(self) -> None:
        if len(self.resampling_stride) != len(self.architecture) - 1:
            raise ValueError(
                f"model.resampling_stride: expected one [z, y, x] stride per level transition "
                f"({len(self.architecture) - 1} for architecture {list(self.architecture)}), "
                f"got {len(self.resampling_stride)}"
            )
        if self.norm not in NORMS:
            raise ValueError(f"model.norm: expected one of {NORMS}, got {self.norm!r}")
        if self.reversible_engine not in ENGINES:
            raise ValueError(f"model.reversible_engine: expected one of {ENGINES}, got {self.reversible_engine!r}")
        _positive("model", channels=self.channels, block_depth=self.block_depth, num_groups=self.num_groups)

    def network_kwargs(self) -> dict:
        """Keyword arguments of ``SegmentationIUNet`` (besides in_channels and num_classes)."""
        return {
            "channels": self.channels,
            "architecture": self.architecture,
            "resampling_stride": self.resampling_stride,
            "block_depth": self.block_depth,
            "kernel_size": self.kernel_size,
            "norm": None if self.norm == "none" else self.norm,
            "num_groups": self.num_groups,
            "channel_mixing_freq": self.channel_mixing_freq,
            "reversible_engine": self.reversible_engine,
        }


@dataclass(frozen=True)
class LossConfig:
    dice_weight: float = 1.0  #: soft Dice over the foreground classes, per patch
    ce_weight: float = 1.0  #: cross-entropy over all classes

    def __post_init__(self) -> None:
        if self.dice_weight < 0 or self.ce_weight < 0 or self.dice_weight + self.ce_weight == 0:
            raise ValueError("loss: dice_weight and ce_weight must be >= 0 and not both 0")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  #: optimizer steps
    seed: int = 0  #: model initialisation and the patch stream
    checkpoint_every: int = 100  #: steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  #: the newest this many are kept (>= 2)
    lr: float = 1e-3  #: peak learning rate (AdamW)
    weight_decay: float = 1e-5
    warmup_steps: int = 50  #: linear warm-up from 0
    schedule: str = "cosine"  #: decay after warm-up: cosine, poly (nnU-Net, exponent 0.9) or constant
    min_lr_ratio: float = 0.01  #: the decay ends at lr * min_lr_ratio
    accumulation_steps: int = 1  #: micro-batches per optimizer step (gradients synchronised on the last)
    clip_grad_norm: float = 12.0  #: 0: no clipping
    precision: str = "bf16"  #: autocast on CUDA (bf16, fp16 with a gradient scaler, fp32); CPU always fp32
    device: str = "auto"  #: auto: CUDA when available (the GPU of LOCAL_RANK), else CPU
    channels_last: bool = False  #: channels-last 3D memory format (1.3-2x faster CPU convolutions)
    log_every: int = 10  #: steps between logged (rank-reduced) training metrics
    #: steps between checks of the iUNet's reconstruction error on the current batch (0: at every validation;
    #: -1: never), logged as health/reconstruction_error
    health_every: int = 0
    health_threshold: float = 1e-3  #: a reconstruction error above this warns once: reversible gradients are off

    def __post_init__(self) -> None:
        _positive("train", steps=self.steps, checkpoint_every=self.checkpoint_every, log_every=self.log_every,
                  accumulation_steps=self.accumulation_steps)  # fmt: skip
        if self.keep_checkpoints < 2:
            raise ValueError(
                f"train.keep_checkpoints: expected >= 2 (so a crash while saving leaves one), "
                f"got {self.keep_checkpoints}"
            )
        if self.lr <= 0 or self.weight_decay < 0 or self.clip_grad_norm < 0 or self.warmup_steps < 0:
            raise ValueError("train: lr must be > 0; weight_decay, clip_grad_norm and warmup_steps >= 0")
        if self.health_every < -1:
            raise ValueError(f"train.health_every: expected -1 (never), 0 (at validations) or a step count, got "
                             f"{self.health_every}")  # fmt: skip
        if not self.health_threshold > 0:
            raise ValueError(f"train.health_threshold: expected a positive number, got {self.health_threshold}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio: expected a number in [0, 1], got {self.min_lr_ratio}")
        for key, value, allowed in (("schedule", self.schedule, SCHEDULES), ("precision", self.precision, PRECISIONS),
                                    ("device", self.device, DEVICES)):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"train.{key}: expected one of {allowed}, got {value!r}")


VALIDATION_MODES = ("volume", "patch")


@dataclass(frozen=True)
class ValidationConfig:
    every: int = 0  #: steps between validations (0: only after the last step)
    mode: str = "volume"  #: volume: sliding-window prediction of whole held-out cases; patch: fixed patches
    overlap: float = 0.5  #: volume mode: window overlap
    mirror: bool = False  #: volume mode: test-time mirroring (8x slower)
    max_memory_mb: float = 4096  #: volume mode: per rank; larger cases stream through a Zarr accumulator
    patches_per_case: int = 4  #: patch mode: fixed, unaugmented patches per held-out case
    foreground_fraction: float = 0.5  #: patch mode: patches centred on a labelled voxel
    batch_size: int = 2  #: windows (volume) or patches per forward pass
    seed: int = 0  #: patch mode: which patches

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"validation.every: expected an integer >= 0, got {self.every}")
        if self.mode not in VALIDATION_MODES:
            raise ValueError(f"validation.mode: expected one of {VALIDATION_MODES}, got {self.mode!r}")
        check_overlap(self.overlap, "validation.overlap")
        if self.max_memory_mb <= 0:
            raise ValueError(f"validation.max_memory_mb: expected a positive number, got {self.max_memory_mb}")
        _positive("validation", patches_per_case=self.patches_per_case, batch_size=self.batch_size)


@dataclass(frozen=True)
class TrainingConfig:
    """The whole run: ``[run]``, ``[data]``, ``[augmentation]``, ``[model]``, ``[loss]``, ``[train]``,
    ``[validation]`` and ``[wandb]`` sections."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def load_training_config(path: Path | str | None, overrides: Sequence[str] = ()) -> TrainingConfig:
    """The config in ``path`` (TOML) with ``section.key=value`` overrides applied, fully checked."""
    return load_config(TrainingConfig, path, overrides)


#: The keys whose value may differ between a checkpoint's config and the config that resumes it
#: (``section.*``: the whole section). They say where the run lives, how long it runs, how often it logs,
#: checks its health, validates and saves, how many loader processes feed it, and how it reports to W&B;
#: they change neither the network, nor the optimisation, nor which patches a step sees. A changed value
#: takes effect from the resumed step (a changed ``train.steps`` also stretches or shortens the rest of the
#: learning-rate decay). Every other key must equal the checkpoint's, or the resume is refused.
RESUME_MAY_CHANGE = (
    "run.dir",
    "data.num_workers",
    "train.steps",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.health_every",
    "train.health_threshold",
    "validation.every",
    "validation.batch_size",
    "validation.max_memory_mb",
    "wandb.*",
)


def may_change_on_resume(key: str) -> bool:
    """Whether ``section.key`` is in ``RESUME_MAY_CHANGE``."""
    return key in RESUME_MAY_CHANGE or f"{key.partition('.')[0]}.*" in RESUME_MAY_CHANGE


def check_resume_config(saved: Mapping | None, config: TrainingConfig, source: str) -> None:
    """Refuse to resume from a checkpoint (``source``, its saved config ``saved``) with ``config`` when a key
    outside ``RESUME_MAY_CHANGE`` differs; the ``ValueError`` lists each as ``key: saved -> new``."""
    if not isinstance(saved, Mapping):
        raise ValueError(f"{source}: holds no config, so a resume cannot be checked against it; use another run.dir")
    try:
        before = to_dict(from_dict(TrainingConfig, saved, f"{source} (its config)"))
    except ConfigError as error:
        raise ValueError(f"{source}: its config does not fit this version of iunet3d ({error})") from None
    after = to_dict(config)
    changed = [
        f"{section}.{key}: {_shown(value)} -> {_shown(after[section][key])}"
        for section, values in before.items()
        for key, value in values.items()
        if value != after[section][key] and not may_change_on_resume(f"{section}.{key}")
    ]
    if changed:
        raise ValueError(
            f"{source}: the config differs from the checkpoint's in keys that may not change on resume: "
            f"{'; '.join(changed)}. Set them back, or start a new run with another run.dir (keys that may "
            f"change: {', '.join(RESUME_MAY_CHANGE)})"
        )


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) or value is None else str(value)
