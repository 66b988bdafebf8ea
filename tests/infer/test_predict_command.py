"""`iunet3d predict`: whole-volume segmentation of a dataset, a case directory or an image file."""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import zarr
from ome_zarr_models.v05 import Image, ImageLabel, Labels

from iunet3d.cli import main
from iunet3d.data import DataError, export_case, open_dataset
from iunet3d.infer.case_metrics import case_metrics
from iunet3d.infer.trained_model import load_trained_model, predict_volume
from tests.helpers.train import REPO, tiny_dataset, train_tiny_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    dataset, checkpoint, _ = train_tiny_checkpoint(tmp_path_factory.mktemp("predict_cli"))
    return dataset, checkpoint


def predict(*args: str) -> None:
    assert main(["predict", "--no-progress", *args]) == 0


def test_a_dataset_gets_prediction_labels_metrics_and_nifti_files(trained, tmp_path):
    dataset, checkpoint = trained
    out, nifti = tmp_path / "out", tmp_path / "nifti"
    predict("--checkpoint", str(checkpoint), "--input", str(dataset), "--out", str(out), "--case", "case_0",
            "--case", "case_2", "--nifti", str(nifti), "--probabilities")  # fmt: skip
    assert open_dataset(out).case_names == ["case_0", "case_2"]
    assert not (out / ".partial").exists()
    model = load_trained_model(checkpoint)
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert [(r["case"], r["class"]) for r in rows] == [
        (c, k) for c in ("case_0", "case_2") for k in model.class_names[1:]
    ]
    for name in ("case_0", "case_2"):
        source, case = open_dataset(dataset).case(name), open_dataset(out).case(name)
        assert case.label_names == ["segmentation", "prediction"]
        prediction = np.asarray(case.label_array("prediction")[...])
        assert np.array_equal(prediction, predict_volume(model, source.image_array))  # streamed == in memory
        assert np.array_equal(case.image_array[...], source.image_array[...])
        group = zarr.open_group(case.path, mode="r")
        assert Labels.from_zarr(group["labels"]).attributes.ome.labels == ["segmentation", "prediction"]
        ImageLabel.from_zarr(group["labels/prediction"])  # valid OME-Zarr 0.5 image-label
        Image.from_zarr(group["probabilities"])  # a valid OME-Zarr 0.5 image with a channel axis
        probabilities = np.asarray(group["probabilities/0"][...], dtype=np.float32)
        assert probabilities.shape == (len(model.class_names), *prediction.shape)
        assert group["probabilities/0"].dtype == np.float16
        assert np.allclose(probabilities.sum(axis=0), 1, atol=4e-3) and probabilities.min() >= 0
        ordered = np.sort(probabilities, axis=0)
        clear = ordered[-1] - ordered[-2] > 4e-3  # float16 rounding can only swap near-ties
        assert clear.mean() > 0.9 and np.array_equal(probabilities.argmax(axis=0)[clear], prediction[clear])
        expected = case_metrics(name, prediction, source.label_array()[...], model.class_names, source.spacing)
        for row, want in zip([r for r in rows if r["case"] == name], expected, strict=True):
            assert float(row["dice"]) == pytest.approx(want["dice"], nan_ok=True)
        written = nib.load(nifti / f"{name}.nii.gz")
        export_case(dataset, name, tmp_path / f"{name}_image.nii.gz")
        assert np.allclose(written.affine, nib.load(tmp_path / f"{name}_image.nii.gz").affine)
        assert written.shape == nib.load(tmp_path / f"{name}_image.nii.gz").shape
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["dice"]) == set(model.class_names[1:]) and len(summary["rows"]) == 6


def test_a_case_directory_and_an_image_file_are_predicted_too(trained, tmp_path):
    dataset, checkpoint = trained
    predict("--checkpoint", str(checkpoint), "--input", str(dataset / "case_1"), "--out", str(tmp_path / "one"))
    assert open_dataset(tmp_path / "one").case_names == ["case_1"]
    image_file = export_case(dataset, "case_1", tmp_path / "scan.nii.gz")
    predict("--checkpoint", str(checkpoint), "--input", str(image_file), "--out", str(tmp_path / "file"))
    from_file = open_dataset(tmp_path / "file").case("scan")
    from_case = open_dataset(tmp_path / "one").case("case_1")
    assert from_file.label_names == ["prediction"] and not (tmp_path / "file" / "metrics.csv").exists()
    assert np.array_equal(from_file.label_array("prediction")[...], from_case.label_array("prediction")[...])


def run_cli(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(args)
    return exited.value.code, capsys.readouterr().err.strip()


def test_inputs_that_do_not_fit_the_checkpoint_and_bad_arguments_are_one_line_errors(trained, tmp_path, capsys):
    dataset, checkpoint = trained
    other = tiny_dataset(tmp_path / "other", cases=1, shape=(8, 32, 32), class_names=("background", "organ"))
    base = ["predict", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]
    code, error = run_cli([*base, "--input", str(other)], capsys)
    assert code == 2 and "has classes ['background', 'organ'], but checkpoint" in error and "\n" not in error
    code, error = run_cli([*base, "--input", str(tmp_path / "absent")], capsys)
    assert code == 2 and error.endswith("absent: no such file or directory")
    code, error = run_cli([*base, "--input", str(dataset), "--overlap", "1"], capsys)
    assert code == 2 and "--overlap: expected 0 <= overlap < 1" in error
    code, error = run_cli([*base, "--input", str(dataset), "--case", "nope"], capsys)
    assert code == 2 and "no case 'nope'" in error
    assert not (tmp_path / "out").exists() or not open_dataset(tmp_path / "out").case_names


def file_tree(root) -> dict[str, bytes | None]:
    """Every path under ``root`` with the bytes of its files (None for directories)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def copy_dataset(trained, path):
    shutil.copytree(trained[0], path)
    return path


def test_another_dataset_is_never_replaced_and_a_rerun_replaces_its_own_predictions(trained, tmp_path, capsys):
    dataset, checkpoint = trained
    other = tiny_dataset(tmp_path / "other", cases=1, shape=(12, 40, 44))
    before = file_tree(other)
    base = ["predict", "--no-progress", "--checkpoint", str(checkpoint), "--input", str(dataset)]
    code, error = run_cli([*base, "--out", str(other)], capsys)
    assert code == 2 and "\n" not in error and str(other) in error and "case case_0" in error
    assert file_tree(other) == before  # not even a lock file
    out = tmp_path / "out"
    predict("--checkpoint", str(checkpoint), "--input", str(dataset), "--out", str(out), "--case", "case_1")
    root = zarr.open_group(out, mode="r").attrs["iunet3d"]
    assert root["prediction"] == {"input": str(dataset.resolve())}
    assert open_dataset(out).case("case_1").info["prediction"] == {"input": str(dataset.resolve()), "case": "case_1"}
    (out / "case_1" / "labels" / "prediction" / "0" / "zarr.json").unlink()  # the rerun replaces it whole
    predict("--checkpoint", str(checkpoint), "--input", str(dataset / "case_1"), "--out", str(out))  # same input
    assert np.asarray(open_dataset(out).case("case_1").label_array("prediction")[...]).shape == (12, 40, 44)
    code, error = run_cli([*base[:-1], str(other), "--out", str(out)], capsys)  # a prediction of another input
    assert code == 2 and f"not a prediction output of {other.resolve()}" in error and "case_0" not in error
    assert open_dataset(out).case_names == ["case_1"]


def test_a_case_name_that_leaves_the_dataset_is_refused_before_anything_is_written(trained, tmp_path, capsys):
    data, checkpoint = copy_dataset(trained, tmp_path / "data"), trained[1]
    metadata = json.loads((data / "case_0" / "zarr.json").read_text())
    metadata["attributes"]["iunet3d"]["name"] = "../victim"
    (data / "case_0" / "zarr.json").write_text(json.dumps(metadata))
    victim = tmp_path / "out" / ".." / "victim"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("mine")
    for out in (tmp_path / "out", data):  # into another dataset, and into the input itself
        argv = ["predict", "--no-progress", "--checkpoint", str(checkpoint), "--input", str(data), "--out", str(out)]
        code, error = run_cli(argv, capsys)
        assert code == 2 and "\n" not in error and "victim" in error
        assert (victim / "keep.txt").read_text() == "mine" and list(victim.iterdir()) == [victim / "keep.txt"]
        assert not (out / "victim").exists() and not (data / "case_1" / "labels" / "prediction").exists()


def test_a_rerun_removes_the_scratch_of_a_killed_streamed_prediction(trained, tmp_path):
    dataset, checkpoint = trained
    out = tmp_path / "out"
    predict("--checkpoint", str(checkpoint), "--input", str(dataset), "--out", str(out), "--case", "case_0")
    leftover = out / ".partial" / ".scratch" / "iunet3d-accumulator-killed" / "accumulator.zarr"
    leftover.mkdir(parents=True)  # where a killed streamed prediction leaves its accumulator
    (leftover / "zarr.json").write_text("{}")
    predict(
        "--checkpoint",
        str(checkpoint),
        "--input",
        str(dataset),
        "--out",
        str(out),
        "--case",
        "case_0",
        "--max-memory",
        "1.8",
    )  # fmt: skip  (streamed: 2 MB in memory)
    assert not list(out.rglob("iunet3d-accumulator-*")) and not (out / ".partial").exists()
    assert open_dataset(out).case_names == ["case_0"]


def test_write_and_read_failures_are_one_line_errors_naming_the_case(trained, tmp_path, capsys):
    data, checkpoint = copy_dataset(trained, tmp_path / "data"), trained[1]
    base = ["predict", "--no-progress", "--checkpoint", str(checkpoint), "--input", str(data)]
    (data / "case_0" / "index" / "dangling").symlink_to(tmp_path / "absent")  # copying the case fails
    code, error = run_cli([*base, "--case", "case_0", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "\n" not in error and error.startswith("iunet3d: error: case case_0: cannot write")
    assert str(tmp_path / "out" / ".partial" / "case_0" / "index" / "dangling") in error
    (data / "case_1" / "labels" / "prediction").write_text("in the way")  # a file where the new label goes
    code, error = run_cli([*base, "--case", "case_1", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "\n" not in error and "case case_1: cannot write" in error
    assert str(tmp_path / "out" / ".partial" / "case_1" / "labels" / "prediction") in error
    code, error = run_cli([*base, "--case", "case_1", "--out", str(data)], capsys)  # in place: not predict's
    assert code == 2 and "\n" not in error and "case_1" in error and "was not written by iunet3d predict" in error
    assert (data / "case_1" / "labels" / "prediction").read_text() == "in the way"
    chunk = next(p for p in (data / "case_2" / "0" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(b"garbage" * 100)
    code, error = run_cli([*base, "--case", "case_2", "--out", str(tmp_path / "out2")], capsys)
    assert code == 2 and "\n" not in error and "case case_2: reading its image" in error
    assert "the store may be corrupted" in error
    lost = copy_dataset(trained, tmp_path / "lost")
    next(p for p in (lost / "case_0" / "0" / "c").rglob("*") if p.is_file()).unlink()  # would read as air
    code, error = run_cli([*base[:-1], str(lost), "--case", "case_0", "--out", str(tmp_path / "out3")], capsys)
    assert code == 2 and "\n" not in error and "case case_0" in error and "is missing" in error


def ground_truth(dataset) -> dict[str, bytes | None]:
    """The image, ground-truth label and index files of every case: predict never changes them."""
    keep = ("0", "labels/segmentation", "index")
    return {f"{case.name}/{part}/{path}": content for case in sorted(dataset.iterdir()) if case.is_dir()
            for part in keep if (case / part).is_dir() for path, content in file_tree(case / part).items()}  # fmt: skip


@pytest.mark.slow
def test_predicting_into_the_input_adds_the_label_and_keeps_image_and_ground_truth(trained, tmp_path):
    data, checkpoint = copy_dataset(trained, tmp_path / "data"), trained[1]
    before = ground_truth(data)
    for run in range(2):  # the second run replaces the first one's prediction
        if run == 1:  # temporary files of metadata writes a kill interrupted: removed by the rerun
            for directory in (data / "case_0", data / "case_0" / "labels"):
                (directory / ".tmp-999999-zarr.json").write_text("{half")
        predict("--checkpoint", str(checkpoint), "--input", str(data), "--out", str(data), "--probabilities")
        assert ground_truth(data) == before
    model = load_trained_model(checkpoint)
    for case in open_dataset(data):
        assert case.label_names == ["segmentation", "prediction"]
        assert case.info["prediction"] == {"input": str(data.resolve()), "case": case.name}
        group = zarr.open_group(case.path, mode="r")
        assert Labels.from_zarr(group["labels"]).attributes.ome.labels == ["segmentation", "prediction"]
        assert np.array_equal(case.label_array("prediction")[...], predict_volume(model, case.image_array))
        assert group["probabilities/0"].shape == (len(model.class_names), *case.shape)
        assert not [p for p in case.path.rglob(".*") if p.name != "zarr.json"]  # no staging leftovers
    rows = list(csv.DictReader((data / "metrics.csv").read_text().splitlines()))
    assert len(rows) == 3 * (len(model.class_names) - 1)  # scored against the ground truth, not "prediction"
    assert not (data / ".partial").exists()


def in_place_events(data):
    """Paths that appear during an in-place prediction, each a point to kill it at."""
    labels = [p / "labels" for p in sorted(data.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    chunks = [path / ".prediction.partial" / "0" / "c" for path in labels]
    return {
        "accumulator": lambda: any(data.rglob("iunet3d-accumulator-*")),
        "staged label": lambda: any((path / ".prediction.partial").exists() for path in labels),
        "staged chunk": lambda: any(p.is_file() for path in chunks for p in path.rglob("*")),
        "old label": lambda: any((path / ".prediction.old").exists() for path in labels),
    }


def run_and_kill(argv, event, timeout=120.0) -> bool:
    """Run ``iunet3d predict`` in a subprocess and SIGKILL it as soon as ``event()``; True if it was killed."""
    process = subprocess.Popen([sys.executable, "-m", "iunet3d", "predict", *argv], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            hit = False
            with contextlib.suppress(OSError):  # a directory removed while it is looked at
                hit = event()
            if hit:
                process.send_signal(signal.SIGKILL)
                process.wait()
                return True
            time.sleep(0.0005)
        return False
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_predicting_into_the_input_survives_kills_at_every_step(trained, tmp_path):
    data, checkpoint = copy_dataset(trained, tmp_path / "data"), trained[1]
    before = ground_truth(data)
    argv = [
        "--no-progress",
        "--checkpoint",
        str(checkpoint),
        "--input",
        str(data),
        "--out",
        str(data),
        "--max-memory",
        "1.8",
    ]  # fmt: skip  (streamed: the accumulator goes to scratch)
    events, seen, killed = in_place_events(data), [], []
    for name in ("accumulator", "staged label", "staged chunk", None, "old label", "staged chunk", "accumulator"):
        if name is None:
            predict(*argv)  # a whole prediction, for the next kills to replace
        elif run_and_kill(argv, events[name]):
            killed.append(name)
            if name == "accumulator":  # a killed streamed run leaves its scratch where a rerun removes it
                assert all(".partial" in p.relative_to(data).parts for p in data.rglob("iunet3d-accumulator-*"))
        assert ground_truth(data) == before
        for case in open_dataset(data):  # complete, and a listed prediction is a whole one
            if "prediction" in case.label_names:
                seen.append((case.name, np.asarray(case.label_array("prediction")[...])))
    assert len(killed) >= 4, killed
    predict(*argv)
    assert ground_truth(data) == before and not list(data.rglob("iunet3d-accumulator-*"))
    final = {case.name: np.asarray(case.label_array("prediction")[...]) for case in open_dataset(data)}
    assert set(final) == {"case_0", "case_1", "case_2"} and all(np.array_equal(final[n], p) for n, p in seen)
    assert not [p for p in data.rglob(".*") if p.name not in ("zarr.json", ".lock")]  # no leftovers


def test_a_lost_chunk_of_a_stored_prediction_is_detected_when_read(trained, tmp_path):
    """Predictions store every chunk (also all-background ones), so a lost chunk file is an error, not
    background."""
    dataset, checkpoint = trained
    out = tmp_path / "out"
    predict("--checkpoint", str(checkpoint), "--input", str(dataset), "--out", str(out), "--case", "case_0",
            "--probabilities")  # fmt: skip
    case = open_dataset(out).case("case_0")
    for array in ("labels/prediction/0", "probabilities/0"):
        chunk_files = sorted(p for p in (case.path / array / "c").rglob("*") if p.is_file())
        grid = zarr.open_array(case.path / array, mode="r").cdata_shape
        assert len(chunk_files) == int(np.prod(grid))  # every chunk stored
    case.label_array("prediction")[...]  # whole: reads
    next(p for p in sorted((case.path / "labels/prediction/0/c").rglob("*")) if p.is_file()).unlink()
    with pytest.raises(DataError, match="case_0.*prediction.*missing"):
        case.label_array("prediction")[...]
