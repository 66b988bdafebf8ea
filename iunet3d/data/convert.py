"""Convert many cases into a dataset: pairing files, parallel workers, resume, a failure summary.

Each case is converted by one worker process from start to finish (read, check, reorient, write,
index), so memory stays at about two copies of one case per worker whatever the dataset size.
Complete cases converted from the same files are skipped, so an interrupted conversion is resumed by
running it again; a complete case converted from other files is left alone and reported as a failure,
unless ``overwrite`` (``--overwrite``) asks to replace it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from iunet3d.data.case_writer import CaseVolume, check_case_name, write_case
from iunet3d.data.dataset import CTCase
from iunet3d.data.dataset_root import DatasetWriting, writing_dataset
from iunet3d.data.errors import DataError
from iunet3d.data.image_files import split_suffix
from iunet3d.data.orientation import Geometry
from iunet3d.data.staging import is_complete_case
from iunet3d.data.storage import StorageOptions

NNUNET_CHANNEL_SUFFIX = "_0000"
REFRESH_EVERY_S = 60.0  # the root's case list is rebuilt this often during a long conversion


@dataclass(frozen=True)
class CaseJob:
    """One case to write: from image (and label) files, or a synthetic phantom."""

    case: str
    image: Path | None = None
    label: Path | None = None
    synthetic: dict | None = None  # make_phantom keyword arguments


@dataclass
class ConversionReport:
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    dataset: dict = field(default_factory=dict)


def _case_files(directory: Path, what: str, allow_dicom: bool) -> dict[str, Path]:
    if not directory.is_dir():
        raise DataError(f"{directory}: {what} directory not found")
    found: dict[str, Path] = {}
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("."):
            continue
        parts = split_suffix(entry.name) if entry.is_file() else ((entry.name, "") if allow_dicom else None)
        if parts is None:
            continue
        stem = parts[0]
        if stem.endswith(NNUNET_CHANNEL_SUFFIX):  # nnU-Net raw layout: case_0000.nii.gz + labels/case.nii.gz
            stem = stem[: -len(NNUNET_CHANNEL_SUFFIX)]
        if stem in found:
            raise DataError(f"{directory}: two {what} inputs for case {stem!r}: {found[stem].name} and {entry.name}")
        found[stem] = entry
    if not found:
        raise DataError(
            f"{directory}: no {what} files found (expected {', '.join(('.nii.gz', '.nii', '.nrrd', '.mha', '.mhd'))}"
            + (" files or DICOM series directories)" if allow_dicom else " files)")
        )
    return found


def pair_case_files(images: Path, labels: Path | None) -> tuple[list[CaseJob], dict[str, str]]:
    """Jobs for every image in ``images``, paired with the same-named label; plus pairing problems."""
    image_files = _case_files(Path(images), "image", allow_dicom=True)
    label_files = _case_files(Path(labels), "label", allow_dicom=False) if labels is not None else {}
    jobs, problems = [], {}
    for case, image in image_files.items():
        if labels is not None and case not in label_files:
            problems[case] = f"{image}: no label file named {case}.* in {labels}"
            continue
        jobs.append(CaseJob(case=case, image=image, label=label_files.get(case)))
    for case, label in label_files.items():
        if case not in image_files:
            problems[case] = f"{label}: no image for this label in {images}"
    return jobs, problems


def _synthetic_case(options: dict) -> CaseVolume:
    from iunet3d.data.synth import make_phantom

    image, label = make_phantom(**options)
    spacing_xyz = tuple(float(s) for s in reversed(options["spacing"]))
    geometry = Geometry(spacing_xyz, (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    source = {
        "synthetic": _synthetic_source(options),
        "image_dtype": "int16",
        "label_dtype": "uint8",
        "geometry": geometry.to_dict(),
        "reorientation": {"permutation": [0, 1, 2], "flipped": [False, False, False]},
    }
    return CaseVolume(image=image, label=label, geometry=geometry, source=source)


def _synthetic_source(options: dict) -> dict:
    """The phantom options as stored in the case attributes (JSON types)."""
    return json.loads(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}))


def _input_files(job: CaseJob) -> dict:
    """The job's input as stored in ``source``: absolute image and label paths (links not resolved)."""
    files = {"image": os.path.abspath(job.image)}
    if job.label is not None:
        files["label"] = os.path.abspath(job.label)
    return files


def convert_case(job: CaseJob, dataset: Path, class_names: Sequence[str] | None, options: StorageOptions) -> dict:
    """Convert one case (in whichever process runs it); raises DataError for bad input."""
    from iunet3d.data.image_files import load_case

    if job.synthetic is not None:
        volume = _synthetic_case(job.synthetic)
    else:
        volume = load_case(job.image, job.label)
        volume.source.update(_input_files(job))  # absolute: a rerun from elsewhere recognises the same files
    return write_case(dataset, job.case, volume, class_names=class_names, options=options)


def _describe(error: BaseException) -> str:
    if isinstance(error, DataError):
        return str(error)
    return f"unexpected {type(error).__name__}: {error}\n{''.join(traceback.format_exception(error)[-3:])}"


def run_conversion(
    jobs: Sequence[CaseJob],
    dataset: Path | str,
    *,
    class_names: Sequence[str] | None = None,
    options: StorageOptions | None = None,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> ConversionReport:
    """Write every job's case into ``dataset`` (created if needed); failures are collected, not raised.

    A complete case of a job's name is skipped when it was converted from the same files (or phantom
    options); one converted from others is a failure naming both, unless ``overwrite``: then every job's
    case is converted again and replaces the stored one (staged, so a failure leaves the old case)."""
    dataset = Path(dataset)
    options = options or StorageOptions()
    if workers < 1:
        raise DataError(f"--workers: expected a positive integer, got {workers}")
    report = ConversionReport()
    jobs = [job for job in jobs if _valid_name(job, report)]
    with writing_dataset(dataset, class_names) as writing:
        todo = [job for job in jobs if overwrite or _to_convert(job, dataset, report)]
        _convert_all(todo, writing, options, workers, progress, report)
    report.dataset = writing.info
    return report


def _to_convert(job: CaseJob, dataset: Path, report: ConversionReport) -> bool:
    """False for a complete case of the job's name: skipped if it came from the same input, else a failure."""
    path = dataset / job.case
    if not is_complete_case(path):
        return True
    try:
        source = CTCase(path).info.get("source", {})
    except DataError as error:
        report.failed[job.case] = str(error)
        return False
    if job.synthetic is not None:
        stored, given = source.get("synthetic"), _synthetic_source(job.synthetic)
    else:
        stored = {key: os.path.abspath(source[key]) for key in ("image", "label") if source.get(key)}
        stored = stored or source.get("synthetic")
        given = _input_files(job)
    if stored == given:
        report.skipped.append(job.case)
    else:
        report.failed[job.case] = (
            f"case {job.case} already exists in {dataset}, converted from {_describe_input(stored)}; "
            f"not replacing it with {_describe_input(given)} (pass --overwrite to replace it)"
        )
    return False


def _describe_input(files: dict | None) -> str:
    if not files or "image" not in files:
        return f"phantom {files}" if files else "an unknown input"
    return files["image"] + (f" with label {files['label']}" if "label" in files else " (no label)")


def _valid_name(job: CaseJob, report: ConversionReport) -> bool:
    try:
        check_case_name(job.case)
        return True
    except DataError as error:
        report.failed[job.case] = f"{job.image}: {error}"
        return False


def _convert_all(todo, writing: DatasetWriting, options, workers, progress, report) -> None:
    dataset, class_names = writing.path, writing.class_names
    bar = tqdm(total=len(todo), unit="case", desc=f"writing {dataset.name}", disable=not progress or not todo)
    last_refresh = time.monotonic()

    def record(case: str, outcome) -> None:
        nonlocal last_refresh
        _record(report, case, outcome, bar)
        if time.monotonic() - last_refresh > REFRESH_EVERY_S:  # keep the case list current on long runs
            writing.refresh()
            last_refresh = time.monotonic()

    try:
        if workers == 1 or len(todo) <= 1:
            for job in todo:
                record(job.case, lambda job=job: convert_case(job, dataset, class_names, options))
        else:
            context = multiprocessing.get_context("spawn")  # no inherited threads or open stores
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context) as pool:
                futures = {pool.submit(convert_case, job, dataset, class_names, options): job for job in todo}
                for future in as_completed(futures):
                    record(futures[future].case, future.result)
    finally:
        bar.close()


def _record(report: ConversionReport, case: str, outcome, bar) -> None:
    try:
        outcome()
        report.converted.append(case)
    except Exception as error:  # one bad case must not stop the others
        report.failed[case] = _describe(error)
    bar.update(1)


def default_workers() -> int:
    """Two workers at most by default: each holds about two copies of a case in memory."""
    return max(1, min(2, os.cpu_count() or 1))
