"""Create a dataset root and rebuild its attributes (case list, class names, statistics) from its cases.

The cases are the source of truth: the root is rebuilt from every complete case after each conversion,
so a conversion killed between writing a case and updating the root loses nothing. The root's
``zarr.json`` is replaced atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

from iunet3d.data.case_writer import PARTIAL_DIR, is_complete_case
from iunet3d.data.dataset import DATASET_KIND, CTCase
from iunet3d.data.errors import DataError
from iunet3d.data.statistics import intensity_statistics, spacing_statistics


def _write_root(path: Path, info: dict) -> None:
    metadata = {"zarr_format": 3, "node_type": "group", "attributes": {"iunet3d": info}}
    temporary = path / f".zarr.json.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(metadata, indent=2))
    os.replace(temporary, path / "zarr.json")


def _read_root(path: Path) -> dict | None:
    metadata = path / "zarr.json"
    if not metadata.exists():
        return None
    try:
        info = json.loads(metadata.read_text()).get("attributes", {}).get("iunet3d")
    except ValueError as error:
        raise DataError(f"{metadata}: unreadable dataset metadata ({error})") from error
    if not info or info.get("kind") != DATASET_KIND:
        raise DataError(f"{path}: exists but is not an iunet3d dataset (its zarr.json has no iunet3d attributes)")
    return info


def prepare_dataset(path: Path, class_names: Sequence[str] | None) -> list[str] | None:
    """Create the dataset at ``path`` if needed and remove leftovers of interrupted conversions.

    Returns the class names to convert with: the given ones (which must agree with the dataset's),
    or the dataset's, or None when neither is known (then they follow from the label values).
    """
    path.mkdir(parents=True, exist_ok=True)
    if not (path / "zarr.json").exists() and any(path.iterdir()):
        raise DataError(f"{path}: directory exists, is not empty and is not an iunet3d dataset")
    info = _read_root(path) or {"kind": DATASET_KIND, "cases": []}
    known = info.get("class_names") if info.get("class_names_given") else None
    if class_names is not None:
        class_names = list(class_names)
        if len(set(class_names)) != len(class_names) or not class_names:
            raise DataError(f"--classes: names must be distinct and non-empty, got {class_names}")
        if known and known != class_names:
            raise DataError(f"--classes {class_names} differ from the dataset's class names {known} ({path})")
        info["class_names"], info["class_names_given"] = class_names, True
    if not (path / "zarr.json").exists() or class_names is not None:
        _write_root(path, info)
    shutil.rmtree(path / PARTIAL_DIR, ignore_errors=True)
    return class_names if class_names is not None else known


def refresh_dataset(path: Path) -> dict:
    """Rebuild the root attributes from all complete cases; returns them."""
    info = _read_root(path) or {"kind": DATASET_KIND}
    cases = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and is_complete_case(p))
    entries, samples, max_label = [], [], 0
    for case_path in cases:
        case = CTCase(case_path)
        entries.append(
            {"name": case.name, "shape": list(case.shape), "spacing": list(case.spacing), "labels": case.label_names}
        )
        samples.append(case.foreground_intensities())
        max_label = max(max_label, case.info.get("max_label") or 0)
    class_names = ["background", *(f"class_{v}" for v in range(1, max_label + 1))]
    if info.get("class_names_given"):
        class_names = info["class_names"]
    info.update(
        {
            "kind": DATASET_KIND,
            "format_version": 1,
            "class_names": class_names,
            "cases": entries,
            "statistics": {
                "cases": len(entries),
                "spacing": spacing_statistics([e["spacing"] for e in entries]) if entries else None,
                "shape_median": [int(v) for v in np.median([e["shape"] for e in entries], axis=0)] if entries else None,
                "foreground_intensity": intensity_statistics(samples),
            },
            "zarr_version": zarr.__version__,
        }
    )
    _write_root(path, info)
    return info
