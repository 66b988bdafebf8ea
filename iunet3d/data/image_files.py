"""Read medical image files (NIfTI, NRRD, MHA/MHD, DICOM series) into canonical case volumes, and back.

SimpleITK (a TorchIO dependency) does the file formats. Everything a user can get wrong is checked
here and reported naming the file: missing or unreadable files, 2D or multi-channel images, NaN/inf
intensities, values outside int16, image/label geometry mismatch, labels that are not small
non-negative integers. Files cut short are refused before ITK reads them (``file_lengths``); DICOM series
whose slices are not one evenly spaced stack are refused by ``dicom_series``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from iunet3d.data.case_writer import CaseVolume
from iunet3d.data.dicom_series import DIRECTION_ATOL, read_dicom_series
from iunet3d.data.errors import DataError
from iunet3d.data.file_lengths import check_file_length
from iunet3d.data.orientation import (
    Geometry,
    Reorientation,
    closest_reorientation,
    from_canonical,
    reorient_geometry,
    to_canonical,
)
from iunet3d.data.staging import atomic_path

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SLAB = 32
_INT16 = np.iinfo(np.int16)
SPACING_RTOL = 1e-4
ORIGIN_ATOL_MM = 1e-2


def split_suffix(name: str) -> tuple[str, str] | None:
    """("case_001", ".nii.gz") for "case_001.nii.gz"; None for a name without an image suffix."""
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return None


def read_volume(path: Path, what: str) -> sitk.Image:
    """A 3D scalar image from a file or a DICOM series directory; ``what`` ("image"/"label") for errors.

    A file cut short, or a series of DICOM slices that is not one evenly spaced stack, is refused before ITK
    reads it (see ``file_lengths`` and ``dicom_series``). A directory holding one multi-frame DICOM
    file reads as that file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: {what} file not found")
    try:
        if path.is_dir():
            image = read_dicom_series(path, what)
        else:
            check_file_length(path, what)
            image = sitk.ReadImage(str(path))
    except OSError as error:
        raise DataError(f"{error.filename or path}: cannot read {what} ({error.strerror})") from None
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
        raise DataError(f"{path}: cannot read {what} ({reason})") from None
    size = image.GetSize()
    if image.GetDimension() != 3:
        raise DataError(f"{path}: {what} is {'x'.join(map(str, size))} ({image.GetDimension()}D); expected a 3D volume")
    if min(size) < 2:
        raise DataError(f"{path}: {what} is {'x'.join(map(str, size))}, a single slice; expected a 3D volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: {what} has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected 1")
    return image


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith((".nii", ".nii.gz"))


def _sitk_affine_ras(image: sitk.Image) -> np.ndarray:
    """4x4 index (i, j, k) -> RAS mm, as SimpleITK placed the volume (ITK works in LPS)."""
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    affine[:3, :3] = lps_to_ras @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = lps_to_ras @ np.asarray(image.GetOrigin())
    return affine


def check_nifti(path: Path, image: sitk.Image, what: str) -> None:
    """Checks ITK's NIfTI reader cannot make: non-finite voxels and an ambiguous header.

    ITK silently turns NaN and inf into 0, and where sform and qform disagree it may take the qform
    while nibabel and most viewers take the sform; both would convert without error into wrong data.
    """
    import nibabel

    try:
        nifti = nibabel.load(str(path))
        header_affine = nifti.affine
    except Exception as error:
        raise DataError(f"{path}: cannot check the NIfTI header of this {what} ({error})") from None
    if not np.allclose(header_affine, _sitk_affine_ras(image), atol=1e-3, rtol=0):
        sform_code, qform_code = (int(nifti.header[key]) for key in ("sform_code", "qform_code"))
        if sform_code == qform_code == 0:
            raise DataError(
                f"{path}: the NIfTI header has no orientation (sform_code = qform_code = 0), so readers place "
                "this volume differently; set a qform or sform (nibabel: img.set_qform(affine, code=1))"
            )
        raise DataError(
            f"{path}: ambiguous NIfTI orientation (sform_code={sform_code}, qform_code={qform_code}): the sform and "
            "qform disagree or the sform is not a rotation with scaling, so readers place this volume differently; "
            "make them agree (nibabel: img.set_qform(img.get_sform())) and convert again"
        )
    if nifti.get_data_dtype().kind != "f":
        return
    bad = sum(
        int(np.count_nonzero(~np.isfinite(np.asarray(nifti.dataobj[:, :, k : k + SLAB]))))
        for k in range(0, nifti.shape[2], SLAB)
    )
    if bad:
        raise DataError(f"{path}: {what} has NaN/inf values ({bad} voxels)")


def _intensities_as_int16(array: np.ndarray, path: Path) -> tuple[np.ndarray, bool]:
    """int16 HU, checked slab by slab; returns (array, whether non-integer values were rounded)."""
    if array.dtype == np.int16:
        return array, False
    out = np.empty(array.shape, dtype=np.int16)
    rounded = False
    for z in range(0, array.shape[0], SLAB):
        slab = array[z : z + SLAB]
        if slab.dtype.kind == "f":
            bad = int(np.count_nonzero(~np.isfinite(slab)))
            if bad:
                raise DataError(f"{path}: image has NaN/inf intensities ({bad} voxels in slices {z}..{z + SLAB - 1})")
            values = np.rint(slab)
            rounded = rounded or not np.array_equal(values, slab)
        else:
            values = slab
        low, high = values.min(), values.max()
        if low < _INT16.min or high > _INT16.max:
            raise DataError(f"{path}: intensities {low}..{high} do not fit int16 Hounsfield units")
        out[z : z + SLAB] = values
    return out, rounded


def _labels_as_uint8(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or not np.array_equal(np.rint(array), array):
            raise DataError(f"{path}: label values must be small non-negative integers; found non-integer values")
    elif array.dtype.kind not in "iu":
        raise DataError(f"{path}: label has voxel type {array.dtype}; expected integers")
    low, high = array.min(), array.max()
    if low < 0 or high > 255:
        raise DataError(f"{path}: label values must be small non-negative integers (0..255); found {low}..{high}")
    return array.astype(np.uint8)


def _check_same_grid(image: sitk.Image, label: sitk.Image, image_path: Path, label_path: Path) -> None:
    def zyx(values):
        return tuple(reversed(values))

    if image.GetSize() != label.GetSize():
        raise DataError(
            f"{label_path}: label shape {zyx(label.GetSize())} (z, y, x) differs from image {image_path} "
            f"shape {zyx(image.GetSize())}"
        )
    if not np.allclose(image.GetSpacing(), label.GetSpacing(), rtol=SPACING_RTOL, atol=0):
        raise DataError(
            f"{label_path}: label spacing {zyx(label.GetSpacing())} mm differs from image {image_path} "
            f"spacing {zyx(image.GetSpacing())} mm"
        )
    if not np.allclose(image.GetOrigin(), label.GetOrigin(), atol=ORIGIN_ATOL_MM, rtol=0):
        raise DataError(f"{label_path}: label origin {label.GetOrigin()} differs from image origin {image.GetOrigin()}")
    if not np.allclose(image.GetDirection(), label.GetDirection(), atol=DIRECTION_ATOL, rtol=0):
        raise DataError(f"{label_path}: label orientation (direction cosines) differs from image {image_path}")


def _geometry(image: sitk.Image) -> Geometry:
    return Geometry(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))


def load_case(image_path: Path, label_path: Path | None) -> CaseVolume:
    """Read, check and reorient one case (image and optional label) into canonical (z, y, x) arrays."""
    image = read_volume(image_path, "image")
    if _is_nifti(Path(image_path)):
        check_nifti(Path(image_path), image, "image")
    source_array = sitk.GetArrayViewFromImage(image)
    hounsfield, rounded = _intensities_as_int16(source_array, Path(image_path))
    if hounsfield is source_array:  # a view of SimpleITK's buffer must not outlive ``image``
        hounsfield = source_array.copy()
    geometry = _geometry(image)
    reorientation = closest_reorientation(geometry.direction)
    source = {
        "image": str(image_path),
        "image_dtype": str(source_array.dtype),
        "rounded": rounded,
        "geometry": geometry.to_dict(),
        "reorientation": reorientation.to_dict(),
    }
    labels = None
    if label_path is not None:
        label = read_volume(label_path, "label")
        if _is_nifti(Path(label_path)):
            check_nifti(Path(label_path), label, "label")
        _check_same_grid(image, label, Path(image_path), Path(label_path))
        label_array = sitk.GetArrayViewFromImage(label)
        classes = _labels_as_uint8(label_array, Path(label_path))
        labels = to_canonical(classes.copy() if classes is label_array else classes, reorientation)
        source.update({"label": str(label_path), "label_dtype": str(label_array.dtype)})
    return CaseVolume(
        image=to_canonical(hounsfield, reorientation),
        label=labels,
        geometry=reorient_geometry(geometry, image.GetSize(), reorientation),
        source=source,
    )


def write_volume(array_zyx: np.ndarray, source: dict, dtype: str, path: Path) -> None:
    """Write a canonical array to ``path`` (format from its suffix) in the source's axis order and geometry."""
    if split_suffix(Path(path).name) is None:
        raise DataError(f"{path}: output must end in one of {', '.join(IMAGE_SUFFIXES)}")
    reorientation = Reorientation.from_dict(source["reorientation"])
    geometry = Geometry.from_dict(source["geometry"])
    array = np.ascontiguousarray(from_canonical(array_zyx, reorientation)).astype(dtype, copy=False)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(Path(path)) as temporary:
            sitk.WriteImage(image, str(temporary), useCompression=True)
    except OSError as error:
        raise DataError(f"{path}: cannot write ({error.strerror})") from None
    except RuntimeError as error:
        raise DataError(f"{path}: cannot write ({str(error).strip().splitlines()[-1]})") from None
