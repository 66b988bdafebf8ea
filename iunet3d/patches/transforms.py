"""TorchIO glue: the augmentation pipeline and patch-sized ``Subject``s. The only module importing TorchIO.

A patch read with its margin becomes a ``Subject`` of a ``ScalarImage`` (the normalised image) and a
``LabelMap``, both carrying the region's affine: the case's voxel spacing along our array axes (z, y, x)
with the region's position as origin. The rotation part of the case's direction is deliberately left
out: augmentation is symmetric in orientation, and this way TorchIO's per-axis parameters (rotation about
axis 0, low resolution along axis 0, flips) refer to our array axes, z being the thick-slice axis. What
the spacing gives is what matters: rotations and zooms act in millimetres, so an anisotropic patch is not
distorted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchio as tio
from torchio.transforms.augmentation.random_transform import RandomTransform
from torchio.transforms.intensity_transform import IntensityTransform

from iunet3d.data.normalization import CTNormalization
from iunet3d.patches.augmentation import AugmentationConfig


class RandomContrast(RandomTransform, IntensityTransform):
    """Multiply each image's deviations from its mean by a factor drawn from ``contrast_range`` (nnU-Net)."""

    def __init__(self, contrast_range: tuple[float, float] = (0.75, 1.25), **kwargs):
        super().__init__(**kwargs)
        self.contrast_range = self._parse_range(contrast_range, "contrast_range", min_constraint=0)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            factor = self.sample_uniform(*self.contrast_range)
            data = image.data.float()
            mean = data.mean()
            image.set_data((data - mean) * factor + mean)
        return subject


def region_steps(config: AugmentationConfig) -> list[tio.Transform]:
    """Transforms that move voxels across the patch border: run on the patch plus its margin.

    Every step is built with ``copy=False``: subjects here are fresh, so TorchIO's defensive deep copy
    per transform would only cost time.
    """
    steps: list[tio.Transform] = []
    if config.affine_probability > 0:
        degrees = tuple(v for d in config.rotation_degrees for v in (-d, d))
        steps.append(
            tio.RandomAffine(
                scales=tuple(config.scale_range) * 3,
                degrees=degrees,
                translation=0,
                isotropic=False,
                center="image",
                p=config.affine_probability,
                copy=False,
            )
        )
    if config.elastic_probability > 0:
        steps.append(
            tio.RandomElasticDeformation(
                num_control_points=config.elastic_control_points,
                max_displacement=tuple(config.elastic_max_displacement_mm),
                p=config.elastic_probability,
                copy=False,
            )
        )
    if config.low_resolution_probability > 0 and config.low_resolution_factor[1] > 1:
        steps.append(
            tio.RandomAnisotropy(
                axes=(config.low_resolution_axis,),
                downsampling=tuple(config.low_resolution_factor),
                scalars_only=True,
                p=config.low_resolution_probability,
                copy=False,
            )
        )
    return steps


def patch_steps(config: AugmentationConfig) -> list[tio.Transform]:
    """Transforms that commute with a centred crop (mirroring, voxel-wise intensity): run on the patch."""
    steps: list[tio.Transform] = []
    if config.flip_axes:
        steps.append(tio.RandomFlip(axes=tuple(config.flip_axes), flip_probability=0.5, copy=False))
    if config.noise_probability > 0:
        steps.append(tio.RandomNoise(std=tuple(config.noise_std), p=config.noise_probability, copy=False))
    if config.gamma_probability > 0:
        steps.append(tio.RandomGamma(log_gamma=tuple(config.log_gamma), p=config.gamma_probability, copy=False))
    if config.contrast_probability > 0:
        steps.append(RandomContrast(tuple(config.contrast_range), p=config.contrast_probability, copy=False))
    return steps


def build_transform(config: AugmentationConfig | None) -> tio.Compose | None:
    """The whole pipeline for ``config`` as one TorchIO transform (spatial first, then intensity)."""
    if config is None:
        return None
    return tio.Compose(region_steps(config) + patch_steps(config), copy=False)


class NormalizeTensor:
    """``normalization`` applied to a tensor; a module-level class so that TorchIO subjects that record it in
    their history still pickle (a Queue's workers send them back to the main process)."""

    def __init__(self, normalization: CTNormalization):
        self.normalization = normalization

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.normalization(tensor.numpy()))


def normalization_transform(normalization: CTNormalization) -> tio.Lambda:
    """``normalization`` as a TorchIO transform of scalar images (for pipelines on whole volumes)."""
    return tio.Lambda(NormalizeTensor(normalization), types_to_apply=[tio.INTENSITY])


def region_affine(spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """4x4 affine of a region whose array axes (z, y, x) have ``spacing`` mm and whose first voxel is at ``origin``."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = origin
    return affine


def _subject(image: torch.Tensor, label: torch.Tensor, affine: np.ndarray) -> tio.Subject:
    return tio.Subject(
        image=tio.ScalarImage(tensor=image, affine=affine), label=tio.LabelMap(tensor=label, affine=affine)
    )


def augment_region(
    image: np.ndarray,
    label: np.ndarray,
    affine: np.ndarray,
    margin: Sequence[int],
    region_transform: tio.Transform | None,
    patch_transform: tio.Transform | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a region read with ``margin`` voxels of context per side, and crop the patch from its centre.

    Args:
        image: float32 (D + 2 mz, H + 2 my, W + 2 mx) normalised intensities.
        label: uint8 region of the same shape.
        affine: 4x4 of the region, from ``region_affine``.
        margin: (mz, my, mx).
        region_transform: applied to the whole region (spatial transforms that need context).
        patch_transform: applied to the cropped patch (flips, intensity).
    Returns:
        image float32 (1, D, H, W) and label uint8 (D, H, W) tensors.
    """
    image_t, label_t = torch.from_numpy(image)[None], torch.from_numpy(label)[None]
    if region_transform is not None:
        augmented = region_transform(_subject(image_t, label_t, affine))
        image_t, label_t = augmented["image"].data, augmented["label"].data
    crop = (slice(None), *(slice(m, n - m) for m, n in zip(margin, image.shape, strict=True)))
    image_t, label_t = image_t[crop], label_t[crop]
    if patch_transform is not None:
        patch_affine = affine.copy()
        patch_affine[:3, 3] += affine[:3, :3] @ np.asarray(margin, dtype=float)
        augmented = patch_transform(_subject(image_t, label_t, patch_affine))
        image_t, label_t = augmented["image"].data, augmented["label"].data
    return image_t.float().contiguous(), label_t[0].contiguous()
