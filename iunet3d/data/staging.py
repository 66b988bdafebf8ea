"""All-or-nothing writes: one atomic file writer, and case directories staged under ``.partial``.

A file is written to a temporary name beside it, flushed to disk and renamed over its final name, then
the directory entry is flushed too: a reader (or a rerun after a kill or a power loss) sees the old file
or the whole new one. A case directory is assembled under ``<dataset>/.partial/<case>``, marked
complete in its attributes last (``iunet3d.complete = true``) and renamed to ``<dataset>/<case>``: a
case directory that exists and says it is complete is complete; anything under ``.partial`` is a
leftover that the next run of the same command removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import zarr

from iunet3d.data.errors import DataError

PARTIAL_DIR = ".partial"
REPLACED_PREFIX = ".replaced-"  #: ``.partial/.replaced-<case>``: a case being replaced, deleted right after
TEMPORARY_PREFIX = ".tmp-"  #: temporary files are ``.tmp-<pid>-<final name>`` beside their final name
_TEMPORARY_NAME = re.compile(rf"{re.escape(TEMPORARY_PREFIX)}\d+-.")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffixes) for any writer to fill, e.g. a library that takes
    a file name. When the block ends without an exception it is flushed to disk, renamed onto ``path``
    and the rename flushed too: readers see all of the file or none of it. Otherwise it is removed."""
    path = Path(path)
    temporary = path.with_name(f"{TEMPORARY_PREFIX}{os.getpid()}-{path.name}")
    try:
        yield temporary
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def remove_temporaries(directory: Path, root: Path) -> None:
    """Remove the ``.tmp-<pid>-*`` files that killed atomic writes left directly inside ``directory``
    (inside ``root``). Call it only while nothing else writes there (e.g. holding the dataset's lock):
    a temporary file is never read, and without this a kill at the wrong instant leaves it for good."""
    directory = check_inside(directory, root, "directory") if Path(directory) != Path(root) else Path(directory)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if _TEMPORARY_NAME.match(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``write(file)``, atomically (``atomic_path``)."""
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        write(file)


def write_text_atomically(path: Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # the rename itself survives a power loss
    finally:
        os.close(descriptor)


def check_inside(path: Path, root: Path, what: str = "path") -> Path:
    """``path`` if it lies inside the directory ``root`` without passing through a symbolic link on the
    way (``root`` itself may be reached through links); else a DataError naming both. Every path a
    command deletes or writes inside a dataset goes through this check first."""
    absolute = Path(os.path.abspath(path))  # ".." resolved by name, links not followed
    relative = None
    for base in (Path(os.path.abspath(root)), Path(root).resolve()):
        if absolute.is_relative_to(base):
            relative, root = absolute.relative_to(base), base
            break
    if relative is None or not relative.parts:
        raise DataError(f"{path}: {what} lies outside {root}; refusing to write or delete it")
    current = root
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            raise DataError(
                f"{current}: is a symbolic link inside {root}; iunet3d never writes or deletes through links "
                "(remove the link, it was not made by iunet3d)"
            )
    return root / relative


def remove_tree(path: Path, root: Path, what: str = "directory") -> None:
    """Delete the directory ``path`` (if it exists) after ``check_inside(path, root)``: never outside
    ``root``, never through or at a symbolic link."""
    path = check_inside(path, root, what)
    if path.exists():
        shutil.rmtree(path)


def is_complete_case(path: Path) -> bool:
    """True when ``path`` holds a case whose writing finished."""
    if not (path / "zarr.json").is_file() or not (path / "0" / "zarr.json").is_file():
        return False
    try:
        attributes = zarr.open_group(path, mode="r").attrs.asdict()
    except Exception:  # unreadable metadata: not complete
        return False
    return bool(attributes.get("iunet3d", {}).get("complete"))


@contextlib.contextmanager
def staged_case(dataset: Path, name: str, *, copy_of: Path | None = None) -> Iterator[Path]:
    """The directory to write case ``name`` of ``dataset`` into: ``<dataset>/.partial/<name>``, empty or,
    with ``copy_of``, a copy of that case. When the block ends without an exception the case is marked
    complete and renamed to ``<dataset>/<name>``; after an exception the partial directory stays for the
    next run to remove. Only an iunet3d case (an earlier output, complete or not) is ever replaced there:
    anything else at ``<dataset>/<name>`` (a user's directory or file) is refused, before and after writing.
    The old case is renamed aside and deleted after the new one is in place, so the name is never without
    a case for longer than between two renames."""
    final = check_inside(dataset / name, dataset, "case directory")
    check_replaceable_case(final)
    partial = check_inside(dataset / PARTIAL_DIR / name, dataset, "staging directory")
    remove_tree(partial, dataset, "staging directory")
    partial.parent.mkdir(parents=True, exist_ok=True)
    if copy_of is not None:
        shutil.copytree(copy_of, partial)
        _set_complete(partial, False)
    yield partial
    _set_complete(partial, True)
    final = check_inside(dataset / name, dataset, "case directory")
    check_replaceable_case(final)
    replaced = check_inside(partial.parent / f"{REPLACED_PREFIX}{name}", dataset, "staging directory")
    remove_tree(replaced, dataset, "staging directory")
    if final.exists():
        os.replace(final, replaced)
    os.replace(partial, final)
    _fsync_directory(dataset)
    remove_tree(replaced, dataset, "staging directory")
    with contextlib.suppress(OSError):  # other cases may still be in progress there
        partial.parent.rmdir()


def check_replaceable_case(path: Path) -> None:
    """Nothing at ``path``, or an iunet3d case directory (a ``zarr.json`` with iunet3d attributes) that a new
    output of the same name may replace; else a DataError naming it (iunet3d never deletes a user's data)."""
    if not os.path.lexists(path):
        return
    attributes = None
    if path.is_dir() and not path.is_symlink():
        try:
            attributes = json.loads((path / "zarr.json").read_text()).get("attributes", {})
        except (OSError, ValueError, AttributeError):
            attributes = None
    if not isinstance(attributes, dict) or not isinstance(attributes.get("iunet3d"), dict):
        raise DataError(
            f"{path}: exists and is not an iunet3d case (no zarr.json with iunet3d attributes); refusing to "
            "replace it -- move it out of the dataset or choose another case name"
        )


def _set_complete(case: Path, complete: bool) -> None:
    group = zarr.open_group(case, mode="r+")
    group.update_attributes({"iunet3d": {**group.attrs.get("iunet3d", {}), "complete": complete}})


def remove_partial_cases(dataset: Path) -> None:
    """Remove what interrupted runs left under ``<dataset>/.partial`` and the temporary files of killed
    writes of the root (call it holding the dataset's lock)."""
    remove_tree(dataset / PARTIAL_DIR, dataset, "staging directory")
    remove_temporaries(dataset, dataset)
