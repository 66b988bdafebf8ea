"""Builders of real test inputs: NIfTI files with oblique anisotropic affines, DICOM series, cases."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from iunet3d.data.case_writer import CaseVolume, write_case
from iunet3d.data.dataset_root import create_dataset_directory, prepare_dataset, refresh_dataset
from iunet3d.data.orientation import Geometry
from iunet3d.data.storage import StorageOptions
from tests.helpers.dicom import write_dicom_slices

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def oblique_affine(spacing_ijk=(2.5, 0.7, 0.8), angle=0.3, origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    """RAS affine: file axis i runs (mostly) inferior, rotated by ``angle`` about z, anisotropic spacing."""
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    permutation = np.array([[0, 0, 1], [0, 1, 0], [-1, 0, 0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ permutation @ np.diag(spacing_ijk)
    affine[:3, 3] = origin
    return affine


def random_ct(shape, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """int16 HU noise and a uint8 label with classes 1..3 of different sizes, both of ``shape``."""
    rng = np.random.default_rng(seed)
    image = rng.integers(-1000, 1500, size=shape, dtype=np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    grid = np.indices(shape)
    centre = np.array(shape)[:, None, None, None] / 2
    radius = np.sqrt((((grid - centre) / (np.array(shape)[:, None, None, None] / 2)) ** 2).sum(axis=0))
    label[radius < 0.7] = 1
    label[radius < 0.3] = 2
    label[tuple(s // 4 for s in shape)] = 3
    return image, label


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def write_dicom_series(directory: Path, volume_zyx: np.ndarray, spacing_xyz, origin_xyz) -> Path:
    """An axial CT series, one file per slice, written by SimpleITK with the tags GDCM needs to stack it."""
    x, y, z = origin_xyz
    positions = [(x, y, z + k * spacing_xyz[2]) for k in range(volume_zyx.shape[0])]
    return write_dicom_slices(directory, volume_zyx, tuple(spacing_xyz[:2]), positions)


def store_case(
    dataset: Path,
    name: str,
    image: np.ndarray,
    label: np.ndarray | None,
    spacing_zyx=(2.5, 0.8, 0.8),
    options: StorageOptions | None = None,
    class_names=("background", "a", "b", "c"),
) -> None:
    """Write arrays straight into a dataset (no files), then refresh its root."""
    create_dataset_directory(dataset)
    prepare_dataset(dataset, list(class_names))
    geometry = Geometry(tuple(reversed(spacing_zyx)), (0.0, 0.0, 0.0), IDENTITY)
    source = {
        "geometry": geometry.to_dict(),
        "reorientation": {"permutation": [0, 1, 2], "flipped": [False] * 3},
        "image_dtype": "int16",
        "label_dtype": "uint8",
    }
    volume = CaseVolume(image=image, label=label, geometry=geometry, source=source)
    write_case(dataset, name, volume, class_names=list(class_names), options=options or StorageOptions())
    refresh_dataset(dataset)
