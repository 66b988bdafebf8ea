"""Create a dataset root and rebuild its attributes (case list, class names, statistics) from its cases.

The cases are the source of truth: the root is rebuilt from every complete case after each conversion,
so a conversion killed between writing a case and updating the root loses nothing (and until then,
``open_dataset`` notices the stale case list and uses the cases on disk). The root's ``zarr.json`` is
replaced atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from iunet3d.data.dataset import DATASET_KIND, CTCase, complete_case_paths, index_cases, read_json_metadata
from iunet3d.data.errors import DataError
from iunet3d.data.staging import check_inside, remove_partial_cases, write_text_atomically


def _write_root(path: Path, info: dict) -> None:
    metadata = {"zarr_format": 3, "node_type": "group", "attributes": {"iunet3d": info}}
    write_text_atomically(path / "zarr.json", json.dumps(metadata, indent=2))


def _read_root(path: Path) -> dict | None:
    try:
        info = read_json_metadata(path / "zarr.json").get("attributes", {}).get("iunet3d")
    except FileNotFoundError:
        return None
    if not info or info.get("kind") != DATASET_KIND:
        raise DataError(f"{path}: exists but is not an iunet3d dataset (its zarr.json has no iunet3d attributes)")
    return info


LOCK_FILE = ".lock"


def create_dataset_directory(path: Path) -> None:
    """Make ``path`` (an existing dataset or a new or empty directory) ready to hold a dataset."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"{path}: cannot create the dataset directory ({error.strerror})") from None
    if not (path / "zarr.json").exists() and any(p.name != LOCK_FILE for p in path.iterdir()):
        raise DataError(f"{path}: directory exists, is not empty and is not an iunet3d dataset")


@contextlib.contextmanager
def dataset_lock(path: Path) -> Iterator[None]:
    """Exclusive right to write ``path`` for one process; a second writer fails at once."""
    with open(path / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"{path}: another conversion is writing to this dataset; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare_dataset(path: Path, class_names: Sequence[str] | None) -> list[str] | None:
    """Write the root of a new dataset at ``path`` and remove leftovers of interrupted conversions.

    Call it after :func:`create_dataset_directory`, holding :func:`dataset_lock`. Returns the class
    names to convert with: the given ones (which must agree with the dataset's and cover its stored
    labels), or the dataset's, or None when neither is known (then they follow from the label values).
    """
    info = _read_root(path) or {"kind": DATASET_KIND, "cases": []}
    known = info.get("class_names") if info.get("class_names_given") else None
    if class_names is not None:
        class_names = list(class_names)
        if len(set(class_names)) != len(class_names) or not class_names:
            raise DataError(f"--classes: names must be distinct and non-empty, got {class_names}")
        if known and known != class_names:
            raise DataError(f"--classes {class_names} differ from the dataset's class names {known} ({path})")
        for case_path in complete_case_paths(path) if not known else []:
            max_label = CTCase(case_path).info.get("max_label") or 0
            if max_label >= len(class_names):
                raise DataError(
                    f"--classes: {len(class_names)} names ({', '.join(class_names)}) but case {case_path.name} "
                    f"of {path} already holds label value {max_label}"
                )
        info["class_names"], info["class_names_given"] = class_names, True
    if not (path / "zarr.json").exists() or class_names is not None:
        _write_root(path, info)
    remove_partial_cases(path)
    return class_names if class_names is not None else known


def refresh_dataset(path: Path) -> dict:
    """Rebuild the root attributes from all complete cases and write them; returns them."""
    info = index_cases(path, _read_root(path) or {"kind": DATASET_KIND})
    _write_root(path, info)
    return info


class DatasetWriting:
    """A dataset opened for writing by this process (``writing_dataset``)."""

    def __init__(self, path: Path, class_names: list[str] | None):
        self.path = path
        self.class_names = class_names  #: to write cases with (None: they follow from the label values)
        self.info: dict = {}  #: the root attributes as last rebuilt

    def refresh(self) -> dict:
        """Rebuild the root attributes from the complete cases now (e.g. during a long run)."""
        self.info = refresh_dataset(self.path)
        return self.info


@contextlib.contextmanager
def writing_dataset(path: Path, class_names: Sequence[str] | None = None) -> Iterator[DatasetWriting]:
    """Create or open the dataset at ``path`` for writing: holds its lock (a second writer fails at
    once), writes the root of a new dataset, removes leftovers of interrupted runs, and rebuilds the
    root from the complete cases when the block ends -- also after an error, since the cases are the
    source of truth. The one way conversion and prediction write a dataset.

    A run that created the dataset and ends without a complete case in it removes what it wrote (root,
    lock file, ``.partial``, and the directory if it made it): a failed first conversion leaves nothing
    that would constrain the corrected rerun (e.g. its class names)."""
    created_directory = not os.path.lexists(path)
    create_dataset_directory(path)
    try:
        with dataset_lock(path):
            created_root = not (path / "zarr.json").exists()
            writing = DatasetWriting(path, None)
            try:
                writing.class_names = prepare_dataset(path, class_names)
                yield writing
            finally:
                if not (created_root and _remove_if_empty(path)):
                    writing.refresh()
    finally:
        if created_directory:
            with contextlib.suppress(OSError):
                path.rmdir()  # only if it is empty: what this run wrote is gone, and nothing else is there


def _remove_if_empty(path: Path) -> bool:
    """Remove the root, the lock file and ``.partial`` of a dataset this run created, if no case of it is
    complete (call it holding the lock); returns whether it did."""
    if complete_case_paths(path):
        return False
    remove_partial_cases(path)  # the dataset is this run's: whatever is staged there was staged by it
    for name in ("zarr.json", LOCK_FILE):
        check_inside(path / name, path, "dataset file").unlink(missing_ok=True)
    return True
