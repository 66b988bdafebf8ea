"""Write one CT case into a dataset, staged (``staging.staged_case``): a killed conversion leaves at
most a ``.partial`` directory, which the next run removes; a case directory that exists is complete.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from iunet3d.data import ome
from iunet3d.data.class_locations import (
    MAX_LOCATIONS_PER_CLASS,
    sample_class_locations,
    sample_foreground_intensities,
)
from iunet3d.data.errors import DataError
from iunet3d.data.orientation import Geometry, zyx
from iunet3d.data.staging import staged_case
from iunet3d.data.storage import StorageOptions, create_volume_array

FORMAT_VERSION = 1
DEFAULT_LABEL_NAME = "segmentation"
INTENSITY_SAMPLES_PER_CASE = 10_000
BODY_THRESHOLD_HU = -500  # foreground for intensity statistics of unlabelled cases
IMAGE_FILL_HU = -1024  #: air: the fill of stored images, and of reads and windows beyond a volume
_CASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ALL_CHUNKS_WRITTEN = "all_chunks_written"  #: storage attribute: the case's arrays stored with every chunk


@dataclass
class CaseVolume:
    """A case ready to store: canonical arrays (z, y, x) and the geometry of that grid."""

    image: np.ndarray  #: int16 (D, H, W) Hounsfield units
    label: np.ndarray | None  #: uint8 (D, H, W) class values, or None
    geometry: Geometry  #: canonical geometry, ITK (x, y, z) order
    source: dict = field(default_factory=dict)  #: provenance and what export needs to restore the file


def check_case_name(name: str) -> str:
    if not isinstance(name, str) or not _CASE_NAME.match(name) or name.endswith(".json"):
        raise DataError(
            f"case name {name!r}: expected letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def _check_volume(name: str, volume: CaseVolume, class_names: Sequence[str] | None) -> None:
    if volume.image.ndim != 3 or volume.image.dtype != np.int16:
        raise DataError(f"case {name}: image must be int16 (D, H, W), got {volume.image.dtype} {volume.image.shape}")
    if volume.label is None:
        return
    if volume.label.shape != volume.image.shape or volume.label.dtype != np.uint8:
        raise DataError(
            f"case {name}: label must be uint8 {volume.image.shape}, got {volume.label.dtype} {volume.label.shape}"
        )
    if class_names is not None:
        top = int(volume.label.max(initial=0))
        if top >= len(class_names):
            label_file = volume.source.get("label", "label")
            raise DataError(
                f"case {name} ({label_file}): label value {top} but the dataset has {len(class_names)} classes "
                f"({', '.join(class_names)}); pass --classes with a name for every label value"
            )


def _write_index(case: zarr.Group, volume: CaseVolume, label_name: str, rng: np.random.Generator) -> dict:
    """Class locations of the label and the foreground intensity sample, as arrays under ``index/``."""
    index = case.create_group("index")
    info: dict = {}
    if volume.label is not None:
        label = volume.label
        locations, counts = sample_class_locations(label, rng, MAX_LOCATIONS_PER_CLASS)
        group = index.create_group(label_name)
        for value, positions in locations.items():
            group.create_array(str(value), data=positions, chunks=positions.shape)
        info["class_voxel_counts"] = {str(v): n for v, n in counts.items()}
        foreground, source = (lambda zs: label[zs] > 0), "label > 0"
    else:
        foreground, source = (lambda zs: volume.image[zs] > BODY_THRESHOLD_HU), f"image > {BODY_THRESHOLD_HU} HU"
    samples = sample_foreground_intensities(volume.image, foreground, rng, INTENSITY_SAMPLES_PER_CASE)
    index.create_array("foreground_intensities", data=samples, chunks=(max(1, samples.size),))
    info["foreground_intensities"] = {"count": int(samples.size), "foreground": source}
    return info


def write_case(
    dataset: Path,
    name: str,
    volume: CaseVolume,
    *,
    class_names: Sequence[str] | None,
    options: StorageOptions,
    label_name: str = DEFAULT_LABEL_NAME,
    seed: int = 0,
) -> dict:
    """Write ``volume`` as case ``name`` of ``dataset``; returns the case summary for the root attributes."""
    check_case_name(name)
    _check_volume(name, volume, class_names)
    try:
        with staged_case(dataset, name) as partial:
            _write_staged(partial, name, volume, class_names, options, label_name, seed)
    except OSError as error:  # disk full, I/O error, a file where a directory must go: name the case and path
        where = error.filename or dataset / name
        raise DataError(f"case {name}: cannot write {where}: {error.strerror or error}") from error
    return _summary(name, volume, label_name)


def _summary(name: str, volume: CaseVolume, label_name: str) -> dict:
    """The case's entry in the dataset root."""
    return {
        "name": name,
        "shape": list(volume.image.shape),
        "spacing": zyx(volume.geometry.spacing),
        "labels": [label_name] if volume.label is not None else [],
        "max_label": int(volume.label.max(initial=0)) if volume.label is not None else None,
    }


def _write_staged(partial: Path, name: str, volume: CaseVolume, class_names, options, label_name, seed) -> None:
    spacing, origin = zyx(volume.geometry.spacing), zyx(volume.geometry.origin)
    case = zarr.open_group(partial, mode="w", zarr_format=3, attributes=ome.image_attributes(name, spacing, origin))
    create_volume_array(case, ome.LEVEL_PATH, volume.image, spacing, options, fill_value=IMAGE_FILL_HU)
    complete_arrays = [ome.LEVEL_PATH]
    if volume.label is not None:
        complete_arrays.append(f"labels/{label_name}/{ome.LEVEL_PATH}")
        names = list(class_names) if class_names else default_class_names(int(volume.label.max(initial=0)))
        labels = case.create_group("labels", attributes=ome.labels_group_attributes([label_name]))
        label_group = labels.create_group(
            label_name, attributes=ome.label_image_attributes(label_name, spacing, origin, names)
        )
        create_volume_array(label_group, ome.LEVEL_PATH, volume.label, spacing, options, fill_value=0)
    rng = np.random.default_rng([seed, *name.encode()])
    index_info = _write_index(case, volume, label_name, rng)
    attributes = {
        "format_version": FORMAT_VERSION,
        **_summary(name, volume, label_name),
        "origin": origin,
        "geometry": volume.geometry.to_dict(),
        "source": volume.source,
        "storage": {**options.to_dict(), ALL_CHUNKS_WRITTEN: complete_arrays},
        "index": index_info,
    }
    case.update_attributes({"iunet3d": attributes})  # "complete" is set by staged_case, last


def default_class_names(max_label: int) -> list[str]:
    """Names for label values 0..max_label when none were given."""
    return ["background", *(f"class_{v}" for v in range(1, max_label + 1))]
