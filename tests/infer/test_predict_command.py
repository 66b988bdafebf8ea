"""`iunet3d predict`: whole-volume segmentation of a dataset, a case directory or an image file."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import zarr
from ome_zarr_models.v05 import Image, ImageLabel, Labels

from iunet3d.cli import main
from iunet3d.data import export_case, open_dataset
from iunet3d.infer.case_metrics import case_metrics
from iunet3d.infer.trained_model import load_trained_model, predict_volume
from tests.helpers.train import tiny_dataset, train_tiny_checkpoint


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
