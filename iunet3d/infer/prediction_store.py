"""Predictions stored as OME-Zarr labels: ``<case>/labels/prediction/0``, in a copy of each case or in place.

Into another dataset (``write_prediction_case``) each case is staged (``staging.staged_case``): copied
(image, ground-truth labels and index) into ``<out>/.partial/<case>``, the prediction written there, and
only then renamed into place, so an interrupted prediction never leaves a case that looks complete.

Into the input dataset itself (``write_prediction_in_place``) the image and the ground-truth labels are
never moved or rewritten: the new label is written under ``labels/.prediction.partial``, the old one is
first unlisted from the case's metadata, the new one swapped in by renames (the old one kept as
``.prediction.old`` until then) and listed again by an atomic metadata write. A case lists
``prediction`` only while a whole one is in place; a rerun restores or removes what a kill left.

Every written case records what it is a prediction of: ``iunet3d.prediction = {"input", "case"}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import zarr

from iunet3d.data import ome
from iunet3d.data.case_writer import ALL_CHUNKS_WRITTEN
from iunet3d.data.dataset import DATASET_KIND, CTCase, read_json_metadata
from iunet3d.data.errors import DataError
from iunet3d.data.staging import check_inside, remove_temporaries, remove_tree, staged_case, write_text_atomically
from iunet3d.data.storage import StorageOptions, blosc_codec, chunk_shape, codec_pipeline, write_skipped_chunks

PREDICTION = "prediction"
PROBABILITIES = "probabilities"  #: ``<case>/probabilities/0``: float16 (K, D, H, W) softmax, OME channel image
RECORD = "prediction"  #: key of ``iunet3d`` attributes: what a case or an output dataset is a prediction of

Fill = Callable[[zarr.Array, zarr.Array | None], None]


def prediction_record(source: str, case: str) -> dict:
    """What a written case is a prediction of: the resolved input (dataset or image file) and its case."""
    return {"input": source, "case": case}


def write_prediction_case(
    source: CTCase,
    out: Path,
    class_names: Sequence[str],
    fill: Fill,
    options: StorageOptions | None = None,
    probabilities: bool = False,
    record: dict | None = None,
) -> Path:
    """Copy case ``source`` into dataset ``out`` with a ``prediction`` label that ``fill`` writes into the
    given empty uint8 (D, H, W) array and, with ``probabilities``, the class probabilities into the
    given float16 (K, D, H, W) array (else None); returns the final case path. ``record`` (what it is a
    prediction of) goes into the case's attributes."""
    options = options or StorageOptions()
    with staged_case(out, source.name, copy_of=source.path) as partial:
        case = zarr.open_group(partial, mode="r+")
        info = dict(case.attrs["iunet3d"])
        names = [name for name in info.get("labels", []) if name != PREDICTION] + [PREDICTION]
        labels = case.require_group("labels")
        labels.update_attributes(ome.labels_group_attributes(names))
        for parent, name in ((labels, PREDICTION), (case, PROBABILITIES)):
            if name in parent:
                del parent[name]
        label, chances = _create_outputs(partial / "labels" / PREDICTION, partial / PROBABILITIES, probabilities,
                                         source, class_names, options, record)  # fmt: skip
        fill(label, chances)
        info = {key: value for key, value in info.items() if key != RECORD}  # an input's own record is not ours
        info["storage"] = _with_checked_arrays(info.get("storage", {}), _store_every_chunk(label, chances))
        case.update_attributes({"iunet3d": {**info, "labels": names, **({RECORD: record} if record else {})}})
    return out / source.name


def write_prediction_in_place(
    source: CTCase,
    dataset: Path,
    class_names: Sequence[str],
    fill: Fill,
    options: StorageOptions | None = None,
    probabilities: bool = False,
    record: dict | None = None,
) -> Path:
    """Add (or replace) the ``prediction`` label of case ``source`` of ``dataset`` in place, as
    ``write_prediction_case`` fills it; image and ground-truth labels stay untouched. Returns the case path."""
    options = options or StorageOptions()
    case = check_inside(source.path, dataset, "case directory")
    slots = [(check_inside(case / "labels", dataset), PREDICTION), (case, PROBABILITIES)]
    for parent, name in slots:
        _recover(parent, name, dataset)
        remove_temporaries(parent, dataset)  # of metadata writes a killed run began
    label, chances = _create_outputs(_staging(slots[0], "partial"), _staging(slots[1], "partial"), probabilities,
                                     source, class_names, options, record)  # fmt: skip
    fill(label, chances)
    written = _store_every_chunk(label, chances)
    names = [name for name in source.label_names if name != PREDICTION]
    _list_labels(case, names, None, [])  # from here until listed again, the case claims no prediction
    for slot in slots:
        _swap(*slot, dataset, new=slot[1] == PREDICTION or probabilities)
    _list_labels(case, [*names, PREDICTION], record, written)
    for slot in slots:
        _remove(_staging(slot, "old"), dataset)
    return case


def check_output(out: Path, source: str, cases: Sequence[CTCase], in_place: bool) -> None:
    """Refuse, before anything is written, to replace what predict did not write: an existing ``out``
    must be empty or a prediction output of the same ``source`` (whose cases of these names are its
    predictions); in place, a ``prediction`` label or probabilities predict did not write are refused."""
    for case in cases:
        check_case_name(case.name, case.path.parent)
    if in_place:
        for case in cases:
            for path in (case.path / "labels" / PREDICTION, case.path / PROBABILITIES):
                if os.path.lexists(check_inside(path, out)) and not _record_of(path):
                    raise DataError(
                        f"case {case.name}: {path} was not written by iunet3d predict; refusing to replace it "
                        "(predict into another --out)"
                    )
        return
    if not (out / "zarr.json").is_file():
        return  # new or empty (a non-empty directory that is no dataset is refused on opening it)
    info = read_json_metadata(out / "zarr.json").get("attributes", {}).get("iunet3d") or {}
    if info.get("kind") != DATASET_KIND:
        raise DataError(f"--out {out}: exists but is not an iunet3d dataset; refusing to write into it")
    ours = (info.get(RECORD) or {}).get("input") == source
    for case in cases:
        path = check_inside(out / case.name, out, "case directory")
        if not os.path.lexists(path):
            continue
        record = _record_of(path) if ours else None
        if record != prediction_record(source, case.name):
            raise DataError(f"--out {out}: case {case.name} there is not a prediction of {source} by iunet3d "
                            "predict; refusing to replace it (choose another --out)")  # fmt: skip
    if not ours and any(not entry.name.startswith(".") for entry in out.iterdir()):
        raise DataError(f"--out {out}: a dataset that is not a prediction output of {source}; refusing to write "
                        "into it (choose another --out)")  # fmt: skip


def mark_output(out: Path, source: str) -> None:
    """Record in the root of output dataset ``out`` that it holds predictions of ``source`` (atomically)."""
    metadata = read_json_metadata(out / "zarr.json")
    metadata["attributes"]["iunet3d"][RECORD] = {"input": source}
    write_text_atomically(out / "zarr.json", json.dumps(metadata, indent=2))


def check_case_name(name: str, dataset: Path) -> None:
    """A case name must be one plain directory name: no separators, not hidden, not ``.``/``..``."""
    if not name or name != Path(name).name or name.startswith(".") or "\\" in name or "\0" in name:
        raise DataError(f"case {name!r} of {dataset}: not a valid case name (one plain directory name expected); "
                        "refusing to write it")  # fmt: skip


def _record_of(path: Path) -> dict | None:
    """The prediction record in the ``iunet3d`` attributes of the group at ``path`` (None if none)."""
    try:
        return read_json_metadata(path / "zarr.json").get("attributes", {}).get("iunet3d", {}).get(RECORD)
    except (FileNotFoundError, DataError, AttributeError):
        return None


def prediction_chunks(source: CTCase, options: StorageOptions | None = None) -> tuple[int, ...]:
    """The chunks of a case's prediction label (as of its image, for the case's shape and spacing)."""
    return chunk_shape(source.shape, source.spacing, options or StorageOptions())


def _create_outputs(label_path: Path, probability_path: Path, probabilities: bool, source: CTCase, class_names,
                    options: StorageOptions, record) -> tuple[zarr.Array, zarr.Array | None]:  # fmt: skip
    """The empty prediction label at ``label_path`` and, with ``probabilities``, the probability array."""
    label = _create_label(label_path, source, class_names, options, record)
    if not probabilities:
        return label, None
    return label, _create_probabilities(probability_path, source, class_names, options, record)


def _create_label(path: Path, source: CTCase, class_names, options: StorageOptions, record) -> zarr.Array:
    attributes = ome.label_image_attributes(PREDICTION, source.spacing, source.origin, list(class_names))
    attributes["iunet3d"] = {RECORD: record}  # marks it as predict's own: a rerun may replace it
    group = zarr.open_group(str(path), mode="w", attributes=attributes)
    with codec_pipeline():
        return group.create_array(ome.LEVEL_PATH, shape=source.shape, dtype="uint8",
                                  chunks=prediction_chunks(source, options),
                                  compressors=[blosc_codec(options, np.dtype("uint8"))], fill_value=0,
                                  dimension_names=["z", "y", "x"])  # fmt: skip


def _create_probabilities(path: Path, source: CTCase, class_names, options: StorageOptions, record) -> zarr.Array:
    attributes = ome.channel_image_attributes(PROBABILITIES, source.spacing, source.origin, class_names)
    attributes["iunet3d"] = {RECORD: record}
    group = zarr.open_group(str(path), mode="w", attributes=attributes)
    with codec_pipeline():
        return group.create_array(ome.LEVEL_PATH, shape=(len(class_names), *source.shape), dtype="float16",
                                  chunks=(1, *prediction_chunks(source, options)),
                                  compressors=[blosc_codec(options, np.dtype("float16"))], fill_value=0.0,
                                  dimension_names=["c", "z", "y", "x"])  # fmt: skip


def _staging(slot: tuple[Path, str], kind: str) -> Path:
    parent, name = slot
    return parent / f".{name}.{kind}"


def _recover(parent: Path, name: str, dataset: Path) -> None:
    """Undo what a killed in-place write left beside ``parent/name``: the staged new copy is removed;
    an old copy is put back when it is the only one (killed between the two renames), else removed."""
    partial, old = _staging((parent, name), "partial"), _staging((parent, name), "old")
    _remove(partial, dataset)
    if check_inside(old, dataset).is_dir():
        if check_inside(parent / name, dataset).exists():
            remove_tree(old, dataset, "old prediction")
        else:
            os.replace(old, parent / name)
            _sync_directory(parent)


def _swap(parent: Path, name: str, dataset: Path, new: bool) -> None:
    """``parent/name`` -> ``.name.old``, then (when ``new``) ``.name.partial`` -> ``parent/name``."""
    final, old = check_inside(parent / name, dataset), _staging((parent, name), "old")
    if final.exists():
        os.replace(final, check_inside(old, dataset))
    if new:
        os.replace(check_inside(_staging((parent, name), "partial"), dataset), final)
    _sync_directory(parent)


def _remove(path: Path, dataset: Path) -> None:
    path = check_inside(path, dataset, "staging leftover")
    if path.is_dir():
        remove_tree(path, dataset, "staging leftover")
    elif path.exists():
        path.unlink()


PREDICTION_ARRAYS = (f"labels/{PREDICTION}/{ome.LEVEL_PATH}", f"{PROBABILITIES}/{ome.LEVEL_PATH}")


def _store_every_chunk(label: zarr.Array, chances: zarr.Array | None) -> list[str]:
    """Write the chunks the prediction skipped (all background) so that every chunk file exists and a
    lost one is detected when read; returns the arrays' paths within the case."""
    write_skipped_chunks(label)
    if chances is not None:
        write_skipped_chunks(chances)
    return list(PREDICTION_ARRAYS[: 1 if chances is None else 2])


def _with_checked_arrays(storage: dict, written: list[str]) -> dict:
    """The case's storage attributes with the prediction arrays listed as storing every chunk exactly
    when they are ``written`` (the other arrays' entries unchanged)."""
    kept = [key for key in storage.get(ALL_CHUNKS_WRITTEN, []) if key not in PREDICTION_ARRAYS]
    return {**storage, ALL_CHUNKS_WRITTEN: kept + written}


def _list_labels(case: Path, names: list[str], record: dict | None, written: list[str]) -> None:
    """Atomically rewrite the labels group's OME list, then (last) the case's own label list, record and
    checked arrays."""
    labels = case / "labels"
    if names or (labels / "zarr.json").exists():
        check_inside(labels / "zarr.json", case, "labels metadata")
        metadata = _metadata(labels / "zarr.json")
        metadata["attributes"] = {**metadata.get("attributes", {}), **ome.labels_group_attributes(names)}
        write_text_atomically(labels / "zarr.json", json.dumps(metadata, indent=2))
    metadata = _metadata(check_inside(case / "zarr.json", case, "case metadata"))
    info = {key: value for key, value in metadata["attributes"]["iunet3d"].items() if key != RECORD}
    info["labels"] = names
    info["storage"] = _with_checked_arrays(info.get("storage", {}), written)
    if record is not None:
        info[RECORD] = record
    metadata["attributes"]["iunet3d"] = info
    write_text_atomically(case / "zarr.json", json.dumps(metadata, indent=2))


def _metadata(path: Path) -> dict:
    try:
        return read_json_metadata(path)
    except FileNotFoundError:
        return {"zarr_format": 3, "node_type": "group", "attributes": {}}


def _sync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # the renames survive a power loss
    finally:
        os.close(descriptor)
