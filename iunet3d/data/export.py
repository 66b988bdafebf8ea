"""Write a stored case (image or label) back to a NIfTI/NRRD/MHA file with its original geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from iunet3d.data.dataset import open_dataset
from iunet3d.data.image_files import write_volume


def export_case(dataset: Path | str, case_name: str, out: Path | str, label: str | None = None) -> Path:
    """Export the image of ``case_name`` (or its label ``label``) to ``out``; returns ``out``.

    The voxels go back to the source file's axis order and orientation, with its spacing, origin and
    direction cosines, and its voxel type where that holds the stored values exactly.
    """
    case = open_dataset(dataset).case(case_name)
    source = case.info["source"]
    if label is None:
        array, dtype = case.image_array[...], source.get("image_dtype", "int16")
    else:
        array, dtype = case.label_array(label)[...], source.get("label_dtype", "uint8")
    if not _holds(np.dtype(dtype), array):
        dtype = array.dtype.name
    write_volume(np.asarray(array), source, dtype, Path(out))
    return Path(out)


def _holds(dtype: np.dtype, array: np.ndarray) -> bool:
    if dtype.kind == "f":
        return True
    if dtype.kind not in "iu":
        return False
    info = np.iinfo(dtype)
    return array.size == 0 or (info.min <= array.min() and array.max() <= info.max)
