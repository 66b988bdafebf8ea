"""Read offline W&B runs back from their files, for tests.

An offline run writes ``<dir>/wandb/offline-run-<time>-<id>[-<n>]/run-<id>.wandb``: a LevelDB-style log
(the format wandb's old ``DataStore`` read; wandb 0.31 ships no Python reader). The file starts with a 7-byte
header (``":W&B"``, magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header
(CRC-32 of type byte + data, length, type: 1 full, 2 first, 3 middle, 4 last); a block's tail shorter than a
chunk header is zero padding. Each reassembled payload is a ``wandb_internal_pb2.Record``.

A file is complete only once the writing process has exited (or called ``wandb.teardown()``); a resumed run
(same id) writes a second folder. Readers here merge the folders of one id in start-time order.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator:
    """The ``Record`` protobufs of one ``.wandb`` file, in order; ValueError on a damaged or truncated file."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if len(data) < FILE_HEADER.size or FILE_HEADER.unpack_from(data) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a W&B transaction log")
    position, pending = FILE_HEADER.size, None
    while position < len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < CHUNK_HEADER.size:
            position += left_in_block
            continue
        if position + CHUNK_HEADER.size > len(data):
            raise ValueError(f"{path}: truncated chunk header at byte {position}")
        checksum, length, kind = CHUNK_HEADER.unpack_from(data, position)
        chunk = data[position + CHUNK_HEADER.size : position + CHUNK_HEADER.size + length]
        position += CHUNK_HEADER.size + length
        if len(chunk) != length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != checksum:
            raise ValueError(f"{path}: damaged or truncated chunk before byte {position}")
        if kind == FIRST:
            pending = chunk
            continue
        if kind in (MIDDLE, LAST):
            if pending is None:
                raise ValueError(f"{path}: chunk of type {kind} without a first chunk")
            pending += chunk
            if kind == MIDDLE:
                continue
            chunk, pending = pending, None
        elif kind != FULL:
            raise ValueError(f"{path}: unknown chunk type {kind} before byte {position}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        yield record


def _value(item) -> object:
    if item.value_json:
        return json.loads(item.value_json)
    kind = item.WhichOneof("value")
    if kind is None or kind == "none":
        return None
    return json.loads(item.json) if kind == "json" else getattr(item, kind)


def _put(target: dict, item) -> None:
    """Flat keys stay flat ("train/loss"); a nested key (a logged dict or media object) builds nested dicts."""
    path = [item.key] if item.key else list(item.nested_key)
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = _value(item)


@dataclass
class OfflineRunFile:
    path: Path
    run_id: str
    start_time: float
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    complete: bool = False  #: the file ends with the run's exit record
    job_type: str = ""  #: e.g. "predict"


def read_offline_file(path: Path) -> OfflineRunFile:
    run = OfflineRunFile(Path(path), "", 0.0)
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id = record.run.run_id
            run.job_type = record.run.job_type
            run.start_time = record.run.start_time.seconds + record.run.start_time.nanos * 1e-9
            for item in record.run.config.update:
                _put(run.config, item)
        elif kind == "config":
            for item in record.config.update:
                _put(run.config, item)
            for item in record.config.remove:
                run.config.pop(item.key or item.nested_key[0], None)
        elif kind == "history":
            row: dict = {}
            for item in record.history.item:
                _put(row, item)
            run.history.append(row)
        elif kind == "exit":
            run.complete = True
    run.config.pop("_wandb", None)
    return run


def read_offline_runs(run_dir: Path, run_id: str | None = None) -> list[OfflineRunFile]:
    """Every offline run file under ``run_dir/wandb`` (of ``run_id``, if given), oldest first."""
    paths = sorted(Path(run_dir, "wandb").glob(f"offline-run-*/run-{run_id or '*'}.wandb"))
    runs = sorted((read_offline_file(path) for path in paths), key=lambda run: run.start_time)
    if run_id is None and len({run.run_id for run in runs}) > 1:
        raise ValueError(f"{run_dir}: several W&B runs {sorted({r.run_id for r in runs})}; pass run_id")
    return runs


def read_offline_run_ids(run_dir: Path) -> list[str]:
    return sorted({read_offline_file(path).run_id for path in Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb")})


def read_offline_history(run_dir: Path, run_id: str | None = None) -> list[dict]:
    """One dict per history row (``{"_step": 3, "train/loss": 0.5, ...}``), across resumed runs, in order."""
    return [row for run in read_offline_runs(run_dir, run_id) for row in run.history]


def read_offline_config(run_dir: Path, run_id: str | None = None) -> dict:
    """The run's config (later runs of a resumed id update earlier ones), without W&B's own ``_wandb`` entry."""
    config: dict = {}
    for run in read_offline_runs(run_dir, run_id):
        config.update(run.config)
    return config


def read_offline_summary(run_dir: Path, run_id: str | None = None) -> dict:
    """The run summary as set by ``run.summary.update`` (the ``summary`` records; later updates of a key win,
    across resumed runs), without W&B's own ``_wandb`` entry."""
    summary: dict = {}
    for run in read_offline_runs(run_dir, run_id):
        for record in read_records(run.path):
            if record.WhichOneof("record_type") == "summary":
                for item in record.summary.update:
                    _put(summary, item)
    summary.pop("_wandb", None)
    return summary


@dataclass
class OfflineArtifact:
    """One logged artifact version as the offline run recorded it (``wandb sync`` uploads it from this)."""

    name: str
    type: str
    aliases: list[str]
    metadata: dict
    digest: str
    #: manifest entries: path in the artifact -> {"digest": base64 MD5, "size": bytes, "local_path": staged copy}
    entries: dict[str, dict]


def read_offline_artifacts(run_dir: Path, run_id: str | None = None) -> list[OfflineArtifact]:
    """The ``artifact`` records of the run (``run.log_artifact``), in the order they were logged."""
    artifacts = []
    for run in read_offline_runs(run_dir, run_id):
        for record in read_records(run.path):
            if record.WhichOneof("record_type") != "artifact":
                continue
            artifact = record.artifact
            entries = {
                entry.path: {"digest": entry.digest, "size": entry.size, "local_path": entry.local_path}
                for entry in artifact.manifest.contents
            }
            metadata = json.loads(artifact.metadata) if artifact.metadata else {}
            artifacts.append(OfflineArtifact(artifact.name, artifact.type, list(artifact.aliases), metadata,
                                             artifact.digest, entries))  # fmt: skip
    return artifacts


def read_logged_table(run_dir: Path, value: dict, run_id: str | None = None) -> dict:
    """The ``wandb.Table`` a history value (``{"_type": "table-file", "artifact_path": ..., "path": ...}``) refers
    to: ``{"columns": [...], "data": [[...]], "files": {path in the table: staged file}}``.

    ``run.log`` writes a table twice: ``files/<value["path"]>`` holds its rows with media cells as bare type names
    ("Image"); the full table, media cells as ``{"_type": "image-file", "path": "media/images/....png", "masks":
    {...}}``, goes into a run-table artifact (``artifact_path``: ``wandb-client-artifact://<client id>/<name>``)
    whose files an offline run stages under ``WANDB_DATA_DIR/artifacts/staging`` and lists in its manifest.
    """
    client_id, _, name = value["artifact_path"].removeprefix("wandb-client-artifact://").partition("/")
    for run in read_offline_runs(run_dir, run_id):
        for record in read_records(run.path):
            if record.WhichOneof("record_type") == "artifact" and record.artifact.client_id == client_id:
                files = {entry.path: Path(entry.local_path) for entry in record.artifact.manifest.contents}
                table = json.loads(files[name].read_text())
                return {"columns": table["columns"], "data": table["data"], "files": files}
    raise ValueError(f"{run_dir}: no artifact {client_id} of table {value.get('path')!r}")
