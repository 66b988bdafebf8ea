"""Open a CT dataset and read regions of its cases.

Layout (a Zarr v3 group per directory)::

    <dataset>/zarr.json                      root attributes "iunet3d": class names, cases, statistics
    <dataset>/<case>/0                       int16 HU (z, y, x), OME-Zarr 0.5 image (scale = spacing)
    <dataset>/<case>/labels/<name>/0         uint8 class values, OME-Zarr 0.5 image-label
    <dataset>/<case>/index/<name>/<class>    int32 (n, 3) sampled voxel positions of each class
    <dataset>/<case>/index/foreground_intensities   int16 (n,) sampled foreground HU
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr

from iunet3d.data.case_writer import (
    ALL_CHUNKS_WRITTEN,
    DEFAULT_LABEL_NAME,
    IMAGE_FILL_HU,
    check_case_name,
    default_class_names,
)
from iunet3d.data.errors import DataError
from iunet3d.data.orientation import Geometry
from iunet3d.data.staging import is_complete_case
from iunet3d.data.statistics import intensity_statistics, spacing_statistics
from iunet3d.data.storage import ChunkCheckedArray, open_volume_array, read_region

DATASET_KIND = "iunet3d-ct-dataset"


def read_json_metadata(path: Path) -> dict:
    """A zarr.json as a dict; FileNotFoundError when absent, DataError when unreadable."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: unreadable metadata ({error})") from error


class CTCase:
    """One case of a dataset: geometry, padded region reads and the class-location index.

    Picklable (it holds paths only; arrays open lazily), so it can go to DataLoader workers.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            attributes = read_json_metadata(self.path / "zarr.json").get("attributes", {})
        except FileNotFoundError:
            raise DataError(f"{self.path}: no such case (no zarr.json)") from None
        info = attributes.get("iunet3d")
        if not info or not info.get("complete"):
            raise DataError(f"{self.path}: not a complete iunet3d case (was its conversion interrupted?)")
        self.info = info
        self.name: str = _checked_case_name(self.path, info.get("name"))
        self.shape: tuple[int, int, int] = tuple(info["shape"])
        self.spacing: tuple[float, float, float] = tuple(info["spacing"])  # z, y, x mm
        self.origin: tuple[float, float, float] = tuple(info["origin"])  # z, y, x mm
        self.label_names: list[str] = list(info["labels"])
        self.geometry = Geometry.from_dict(info["geometry"])
        self._label_arrays: dict[str, zarr.Array] = {}

    def __repr__(self) -> str:
        return f"CTCase({self.name!r}, shape={self.shape}, spacing={self.spacing}, labels={self.label_names})"

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    @property
    def has_label(self) -> bool:
        return bool(self.label_names)

    @property
    def affine(self) -> np.ndarray:
        """4x4 map from array index (z, y, x, 1) to physical LPS millimetres (x, y, z, 1)."""
        direction = self.geometry.matrix()
        affine = np.eye(4)
        for axis in range(3):  # array axis a is ITK axis 2 - a
            itk_axis = 2 - axis
            affine[:3, axis] = direction[:, itk_axis] * self.geometry.spacing[itk_axis]
        affine[:3, 3] = self.geometry.origin
        return affine

    @cached_property
    def image_array(self) -> zarr.Array | ChunkCheckedArray:
        """int16 HU (D, H, W), indexed like a zarr array; a read that touches a lost chunk file fails (DataError)."""
        return self._open_array("0", "image")

    def label_array(self, name: str | None = None) -> zarr.Array | ChunkCheckedArray:
        """uint8 classes (D, H, W) of label ``name`` (default: the segmentation), indexed like a zarr array."""
        name = self._label_name(name)
        if name not in self._label_arrays:  # opened once: opening reads and parses zarr.json
            self._label_arrays[name] = self._open_array(f"labels/{name}/0", f"label {name!r}")
        return self._label_arrays[name]

    def _label_name(self, name: str | None) -> str:
        if not self.label_names:
            raise DataError(f"case {self.name} ({self.path}) has no label")
        name = name or (DEFAULT_LABEL_NAME if DEFAULT_LABEL_NAME in self.label_names else self.label_names[0])
        if name not in self.label_names:
            raise DataError(f"case {self.name}: no label {name!r}; it has {', '.join(self.label_names)}")
        return name

    def _open_array(self, key: str, what: str) -> zarr.Array | ChunkCheckedArray:
        """The array at ``key``; checked for lost chunk files when the case says all its chunks were written
        (cases written before that was recorded, and arrays added later, are read as they are)."""
        try:
            array = open_volume_array(self.path / key)
        except Exception as error:
            raise DataError(f"case {self.name}: cannot open {what} array {self.path / key}: {error}") from error
        if key in self.info.get("storage", {}).get(ALL_CHUNKS_WRITTEN, []):
            return ChunkCheckedArray(array, f"case {self.name}: {what} array {self.path / key}")
        return array

    def _read(self, array: zarr.Array | ChunkCheckedArray, what: str, start, size, pad_value) -> np.ndarray:
        try:
            return read_region(array, start, size, pad_value)
        except DataError:
            raise
        except Exception as error:
            raise DataError(
                f"case {self.name}: reading the {what} region start={tuple(start)} size={tuple(size)} "
                f"from {self.path} failed ({type(error).__name__}: {error}); the store may be corrupted"
            ) from error

    def read_image(self, start: Sequence[int], size: Sequence[int], pad_value: int = IMAGE_FILL_HU) -> np.ndarray:
        """int16 HU (size) of region ``[start, start + size)`` (z, y, x); outside the volume: ``pad_value``."""
        return self._read(self.image_array, "image", start, size, pad_value)

    def read_label(
        self, start: Sequence[int], size: Sequence[int], pad_value: int = 0, name: str | None = None
    ) -> np.ndarray:
        """uint8 classes (size) of region ``[start, start + size)``; outside the volume: ``pad_value``."""
        return self._read(self.label_array(name), f"label {self._label_name(name)!r}", start, size, pad_value)

    def class_voxel_counts(self, name: str | None = None) -> dict[int, int]:
        """Number of voxels of each class value >= 1 present in the label."""
        self._label_name(name)  # validates the name; a case stores one label
        counts = self.info["index"].get("class_voxel_counts", {})
        return {int(value): count for value, count in counts.items()}

    def class_locations(self, value: int, name: str | None = None) -> np.ndarray:
        """int32 (n, 3): uniformly sampled (z, y, x) positions of voxels of class ``value`` (n = 0 if absent)."""
        name = self._label_name(name)
        if value not in self.class_voxel_counts(name):
            return np.zeros((0, 3), dtype=np.int32)
        return np.asarray(self._open_array(f"index/{name}/{value}", f"class {value} locations")[...])

    def foreground_intensities(self) -> np.ndarray:
        """The sample of foreground HU drawn at conversion, int16 (n,)."""
        return np.asarray(self._open_array("index/foreground_intensities", "foreground intensities")[...])


class CTDataset:
    """A directory of CT cases in Zarr, with class names and dataset statistics in its root."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"{self.path}: no such dataset directory")
        try:
            attributes = read_json_metadata(self.path / "zarr.json").get("attributes", {})
        except FileNotFoundError:
            attributes = {}
        info = attributes.get("iunet3d", {})
        if info.get("kind") != DATASET_KIND:
            raise DataError(
                f"{self.path}: not an iunet3d dataset (its zarr.json lacks iunet3d attributes); "
                "create one with `iunet3d convert` or `iunet3d synth`"
            )
        listed = _listed_case_names(self.path, info)
        if case_list_is_stale(self.path, listed):
            complete = complete_case_paths(self.path)
            warnings.warn(
                f"{self.path}: its root lists {len(listed)} cases but {len(complete)} complete cases are on disk "
                "(a conversion was interrupted?); using the cases on disk (the next `iunet3d convert` into it "
                "rewrites the list)",
                UserWarning,
                stacklevel=2,
            )
            info = index_cases(self.path, dict(info), complete)
            listed = [entry["name"] for entry in info["cases"]]
        self.info = info
        self.class_names: list[str] = list(info.get("class_names") or ["background"])
        self.statistics: dict = info.get("statistics") or {}
        self.case_names: list[str] = listed

    def __repr__(self) -> str:
        return f"CTDataset({str(self.path)!r}, cases={len(self)}, classes={self.class_names})"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.case_names)

    def __contains__(self, name: object) -> bool:
        return name in self.case_names

    def __iter__(self) -> Iterator[CTCase]:
        return (self.case(name) for name in self.case_names)

    def case(self, name: str) -> CTCase:
        if name not in self.case_names:
            shown = ", ".join(self.case_names[:10]) + (" ..." if len(self) > 10 else "")
            raise DataError(f"{self.path}: no case {name!r}; cases: {shown or '(none)'}")
        return CTCase(self.path / name)


def _checked_case_name(path: Path, name: object) -> str:
    """The case's ``iunet3d.name``: a valid case name (as on the command line) equal to its directory's name."""
    try:
        check_case_name(name)
    except DataError as error:
        raise DataError(
            f"{path.parent}: case directory {path.name}: bad iunet3d.name in its zarr.json: {error}"
        ) from None
    if name != path.name:
        raise DataError(
            f"{path.parent}: case directory {path.name!r} says its name is {name!r} (iunet3d.name in its zarr.json); "
            "a case's name must be its directory's name"
        )
    return name


def _listed_case_names(path: Path, info: dict) -> list[str]:
    """The names in the root's case list, each a valid case name (no paths: they are joined to ``path``)."""
    cases = info.get("cases", [])
    if not isinstance(cases, list) or not all(isinstance(entry, dict) for entry in cases):
        raise DataError(f"{path}: iunet3d.cases in its zarr.json must be a list of case entries")
    names = []
    for entry in cases:
        try:
            names.append(check_case_name(entry.get("name")))
        except DataError as error:
            raise DataError(f"{path}: bad entry in the case list of its zarr.json: {error}") from None
    return names


def complete_case_paths(path: Path) -> list[Path]:
    """The directories of ``path`` holding a complete case, sorted by name."""
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and is_complete_case(p))


def case_list_is_stale(path: Path, listed: Sequence[str]) -> bool:
    """True when the case list ``listed`` of the root of ``path`` differs from the complete cases on disk (a
    conversion killed between writing a case and updating the root). Cheap: one directory listing; only
    directories the list lacks are opened."""
    on_disk = {p.name for p in path.iterdir() if not p.name.startswith(".") and p.is_dir()}
    if not set(listed) <= on_disk or len(set(listed)) != len(listed):
        return True
    return any(is_complete_case(path / name) for name in on_disk - set(listed))


def index_cases(path: Path, info: dict, cases: Sequence[Path] | None = None) -> dict:
    """``info`` (root attributes) with the case list, class names and statistics rebuilt from the complete
    cases of ``path`` (or the given case directories)."""
    entries, samples, max_label = [], [], 0
    for case_path in complete_case_paths(path) if cases is None else cases:
        case = CTCase(case_path)
        entries.append(
            {"name": case.name, "shape": list(case.shape), "spacing": list(case.spacing), "labels": case.label_names}
        )
        samples.append(case.foreground_intensities())
        max_label = max(max_label, case.info.get("max_label") or 0)
    class_names = info["class_names"] if info.get("class_names_given") else default_class_names(max_label)
    shapes = [entry["shape"] for entry in entries]
    return {
        **info,
        "kind": DATASET_KIND,
        "format_version": 1,
        "class_names": class_names,
        "cases": entries,
        "statistics": {
            "cases": len(entries),
            "spacing": spacing_statistics([e["spacing"] for e in entries]) if entries else None,
            "shape_median": [int(v) for v in np.median(shapes, axis=0)] if entries else None,
            "foreground_intensity": intensity_statistics(samples),
        },
        "zarr_version": zarr.__version__,
    }


def open_dataset(path: CTDataset | Path | str) -> CTDataset:
    """The dataset at ``path`` (an already opened ``CTDataset`` is returned as it is)."""
    return path if isinstance(path, CTDataset) else CTDataset(path)
