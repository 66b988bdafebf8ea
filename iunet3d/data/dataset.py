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
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr

from iunet3d.data.case_writer import DEFAULT_LABEL_NAME, IMAGE_FILL_HU
from iunet3d.data.errors import DataError
from iunet3d.data.orientation import Geometry
from iunet3d.data.storage import open_volume_array, read_region

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
        self.name: str = info["name"]
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
    def image_array(self) -> zarr.Array:
        return self._open_array("0", "image")

    def label_array(self, name: str | None = None) -> zarr.Array:
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

    def _open_array(self, key: str, what: str) -> zarr.Array:
        try:
            return open_volume_array(self.path / key)
        except Exception as error:
            raise DataError(f"case {self.name}: cannot open {what} array {self.path / key}: {error}") from error

    def _read(self, array: zarr.Array, what: str, start, size, pad_value) -> np.ndarray:
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
        self.info = info
        self.class_names: list[str] = list(info.get("class_names") or ["background"])
        self.statistics: dict = info.get("statistics", {})
        self.case_names: list[str] = [entry["name"] for entry in info.get("cases", [])]

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


def open_dataset(path: CTDataset | Path | str) -> CTDataset:
    """The dataset at ``path`` (an already opened ``CTDataset`` is returned as it is)."""
    return path if isinstance(path, CTDataset) else CTDataset(path)
