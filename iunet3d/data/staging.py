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
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import zarr

PARTIAL_DIR = ".partial"
TEMPORARY_PREFIX = ".tmp-"  #: temporary files are ``.tmp-<pid>-<final name>`` beside their final name


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
    complete and renamed to ``<dataset>/<name>`` (replacing an incomplete leftover or an earlier output
    of the same command); after an exception the partial directory stays for the next run to remove."""
    partial = dataset / PARTIAL_DIR / name
    if partial.exists():
        shutil.rmtree(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    if copy_of is not None:
        shutil.copytree(copy_of, partial)
        _set_complete(partial, False)
    yield partial
    _set_complete(partial, True)
    final = dataset / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync_directory(dataset)
    with contextlib.suppress(OSError):  # other cases may still be in progress there
        partial.parent.rmdir()


def _set_complete(case: Path, complete: bool) -> None:
    group = zarr.open_group(case, mode="r+")
    group.update_attributes({"iunet3d": {**group.attrs.get("iunet3d", {}), "complete": complete}})


def remove_partial_cases(dataset: Path) -> None:
    """Remove what interrupted runs left under ``<dataset>/.partial`` (call it holding the dataset's lock)."""
    shutil.rmtree(dataset / PARTIAL_DIR, ignore_errors=True)
