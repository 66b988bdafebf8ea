"""What augmentation to apply to training patches, and how much context a patch needs for it.

This module only describes the augmentation (no TorchIO import); ``transforms`` builds the TorchIO
pipeline from it. Axes are array axes (0 = z, the thick-slice axis of anisotropic CT, 1 = y, 2 = x).

Spatial transforms run on a region larger than the patch by ``augmentation_margin`` voxels on each
side, and the result is centre-cropped to the patch, so no padding introduced by a rotation, a zoom-out
or an elastic displacement reaches the network (nnU-Net enlarges its crop the same way).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from iunet3d.data.errors import DataError


@dataclass(frozen=True)
class AugmentationConfig:
    """Random augmentation of training patches (TorchIO). Probabilities are per patch.

    Defaults follow nnU-Net's CT recipe scaled to anisotropic data: rotation only about the thick-slice
    axis, mirroring on all axes, mild zoom, noise, gamma and contrast, simulated low resolution along z.
    """

    flip_axes: tuple[int, ...] = (0, 1, 2)  #: each axis is mirrored with probability 0.5
    affine_probability: float = 0.2
    rotation_degrees: tuple[float, float, float] = (15.0, 0.0, 0.0)  #: max |angle| about the z, y, x axes
    scale_range: tuple[float, float] = (0.85, 1.25)  #: zoom factor range, per axis
    elastic_probability: float = 0.0  #: off by default: slow, and of small benefit on CT
    elastic_control_points: int = 7
    elastic_max_displacement_mm: tuple[float, float, float] = (4.0, 8.0, 8.0)  #: z, y, x
    noise_probability: float = 0.1
    noise_std: tuple[float, float] = (0.0, 0.1)  #: in normalised intensity units
    gamma_probability: float = 0.3
    log_gamma: tuple[float, float] = (-0.3, 0.3)
    contrast_probability: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)  #: deviations from the patch mean are multiplied by this
    low_resolution_probability: float = 0.25
    low_resolution_axis: int = 0  #: the axis whose resolution is reduced (z: thick slices)
    low_resolution_factor: tuple[float, float] = (1.0, 2.0)  #: downsampling factor range along that axis

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name.endswith("_probability"):
                value = getattr(self, f.name)
                if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                    raise DataError(f"augmentation {f.name}: expected a number in [0, 1], got {value!r}")
        if any(axis not in (0, 1, 2) for axis in self.flip_axes):
            raise DataError(f"augmentation flip_axes: expected axes among 0, 1, 2, got {self.flip_axes!r}")
        if self.low_resolution_axis not in (0, 1, 2):
            raise DataError(f"augmentation low_resolution_axis: expected 0, 1 or 2, got {self.low_resolution_axis!r}")
        _check_range("scale_range", self.scale_range, minimum=1e-3)
        _check_range("noise_std", self.noise_std, minimum=0.0)
        _check_range("log_gamma", self.log_gamma)
        _check_range("contrast_range", self.contrast_range, minimum=0.0)
        _check_range("low_resolution_factor", self.low_resolution_factor, minimum=1.0)
        _check_triplet("rotation_degrees", self.rotation_degrees, maximum=90.0)
        _check_triplet("elastic_max_displacement_mm", self.elastic_max_displacement_mm, maximum=math.inf)
        if not isinstance(self.elastic_control_points, int) or self.elastic_control_points < 4:
            raise DataError(
                f"augmentation elastic_control_points: expected an integer >= 4, got {self.elastic_control_points!r}"
            )

    @property
    def needs_context(self) -> bool:
        """Whether a transform mixes voxels across the patch border (affine, elastic, low resolution)."""
        low_resolution = self.low_resolution_probability > 0 and self.low_resolution_factor[1] > 1
        return self.affine_probability > 0 or self.elastic_probability > 0 or low_resolution

    def draw_context_steps(self, rng: np.random.Generator) -> AugmentationConfig:
        """This config with each context-needing transform decided for one patch (probability 1 or 0).

        Deciding before the read lets a patch that gets no affine, elastic or low-resolution transform be
        read without a margin and skip the expensive region stage: most patches at the default settings.
        """
        decided = {
            key: float(rng.random() < getattr(self, key))  # always three draws: a fixed use of the generator
            for key in ("affine_probability", "elastic_probability", "low_resolution_probability")
        }
        return replace(self, **decided)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_range(name: str, value: Sequence[float], minimum: float = -math.inf) -> None:
    if len(value) != 2 or not all(isinstance(v, (int, float)) for v in value) or not minimum <= value[0] <= value[1]:
        raise DataError(f"augmentation {name}: expected two numbers low <= high (low >= {minimum}), got {value!r}")


def _check_triplet(name: str, value: Sequence[float], maximum: float) -> None:
    if len(value) != 3 or not all(isinstance(v, (int, float)) and 0 <= v <= maximum for v in value):
        raise DataError(f"augmentation {name}: expected three numbers in [0, {maximum}] (z, y, x), got {value!r}")


def augmentation_margin(
    patch_size: Sequence[int], spacing: Sequence[float], config: AugmentationConfig | None
) -> tuple[int, int, int]:
    """Voxels of context needed on each side of a ``patch_size`` (z, y, x) patch for ``config``.

    Bounds the region that the worst-case rotation (about each axis in turn, in millimetres so that
    anisotropic spacing counts), zoom-out and elastic displacement map the patch from, plus the
    downsampling factor along the low-resolution axis and one voxel for interpolation. Zero when no
    transform needs context (flips and intensity transforms run on the patch itself).
    """
    if config is None or not config.needs_context:
        return (0, 0, 0)
    extent = np.array([size * step for size, step in zip(patch_size, spacing, strict=True)])  # mm
    if config.affine_probability > 0:
        # |R_a R_b R_c| <= |R_a| |R_b| |R_c| elementwise bounds the box of any rotation within the ranges;
        # the order in which the three rotations compose is TorchIO's (ITK's) business: take the worst
        turns = [_abs_rotation(axis, degrees) for axis, degrees in enumerate(config.rotation_degrees)]
        extent = np.max([a @ b @ c @ extent for a, b, c in itertools.permutations(turns)], axis=0)
        extent = extent * max(1.0 / config.scale_range[0], config.scale_range[1])
    displacement = config.elastic_max_displacement_mm if config.elastic_probability > 0 else (0.0, 0.0, 0.0)
    margin = [
        max(0, math.ceil((e / step - size) / 2)) + math.ceil(d / step) + 1
        for e, step, size, d in zip(extent, spacing, patch_size, displacement, strict=True)
    ]
    if config.low_resolution_probability > 0:
        margin[config.low_resolution_axis] += math.ceil(config.low_resolution_factor[1])
    return tuple(margin)


def _abs_rotation(axis: int, degrees: float) -> np.ndarray:
    """Elementwise bound of |R| over all rotations about ``axis`` by at most ``degrees`` (<= 90): cos <= 1."""
    i, j = (a for a in range(3) if a != axis)
    sin = math.sin(math.radians(degrees))
    matrix = np.eye(3)
    matrix[i, j] = matrix[j, i] = sin
    return matrix
