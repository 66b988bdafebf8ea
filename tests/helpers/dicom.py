"""DICOM inputs with chosen per-slice geometry, and files cut short, written with SimpleITK."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import SimpleITK as sitk

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SERIES_UID = "1.2.826.0.1.3680043.2.1125.1.43"


def write_dicom_slices(
    directory: Path, volume_zyx: np.ndarray, pixel_spacing_xy, positions, orientations=None, compress=False
) -> Path:
    """One CT file per slice of ``volume_zyx``, slice k at ImagePositionPatient ``positions[k]`` (x, y, z mm)
    with ImageOrientationPatient ``orientations[k]`` (6 direction cosines; axial where not given). Files are
    implicit VR little endian, or with ``compress`` explicit VR with encapsulated lossless JPEG 2000 pixel data."""
    directory.mkdir(parents=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetUseCompression(compress)
    for k, position in enumerate(positions):
        plane = sitk.GetImageFromArray(volume_zyx[k])
        plane.SetSpacing(pixel_spacing_xy)
        orientation = orientations[k] if orientations is not None else AXIAL
        for tag, value in {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1.41",
            "0020|000e": SERIES_UID,
            "0020|0037": "\\".join(f"{v:.6f}" for v in orientation),
            "0020|0032": "\\".join(f"{v:.4f}" for v in position),
            "0020|0013": str(k + 1),
            "0028|1052": "0",
            "0028|1053": "1",
        }.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(directory / f"slice_{k:03d}.dcm"))
        writer.Execute(plane)
    return directory


def axial_positions(count: int, step_mm: float, origin=(-50.0, 20.0, 100.0)) -> list[tuple[float, float, float]]:
    return [(origin[0], origin[1], origin[2] + k * step_mm) for k in range(count)]


def write_multiframe(path: Path, volume_zyx: np.ndarray, spacing_xyz, origin_xyz) -> Path:
    """A 3D volume as one multi-frame DICOM file (SimpleITK writes uint16, not int16, volumes this way)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(volume_zyx.astype(np.uint16))
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin_xyz)
    sitk.WriteImage(image, str(path))
    return path


def cut(path: Path, keep: float = 0.5) -> Path:
    """Keep the first ``keep`` fraction of the file's bytes, as an interrupted copy or download does."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def gzip_bytes(path: Path, data: bytes) -> Path:
    """A complete gzip stream of ``data`` (e.g. a NIfTI whose voxels were cut before it was compressed)."""
    path.write_bytes(gzip.compress(data))
    return path
