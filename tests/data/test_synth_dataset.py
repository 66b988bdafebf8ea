"""``iunet3d synth``: the built-in dataset, written through the same store as converted CT."""

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import zarr
from ome_zarr_models.v05 import Image, ImageLabel

from iunet3d.data import export_case, open_dataset
from tests.helpers.cli import run_cli


def synth(out, *extra):
    command = [sys.executable, "-m", "iunet3d", "synth", "--out", str(out), "--shape", "24", "48", "48",
               "--no-progress", *extra]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, encoding="utf-8")


@pytest.mark.slow
def test_synth_writes_a_labelled_deterministic_dataset_and_resumes(tmp_path):
    first = synth(tmp_path / "a", "--cases", "2", "--seed", "3", "--workers", "2")
    assert first.returncode == 0, first.stderr
    assert "2 converted, 0 already complete, 0 failed" in first.stdout
    assert synth(tmp_path / "b", "--cases", "2", "--seed", "3").returncode == 0
    assert synth(tmp_path / "c", "--cases", "1", "--seed", "4").returncode == 0
    a, b, c = (open_dataset(tmp_path / name) for name in "abc")
    assert a.class_names == ["background", "liver", "kidney", "lesion"]
    assert a.case_names == ["synth_000", "synth_001"]
    images = [a.case(name).image_array[...] for name in a.case_names]
    for name, image in zip(a.case_names, images, strict=True):
        np.testing.assert_array_equal(b.case(name).image_array[...], image)  # same seed, same case
        np.testing.assert_array_equal(b.case(name).label_array()[...], a.case(name).label_array()[...])
    assert not np.array_equal(images[0], images[1])  # cases differ
    assert not np.array_equal(c.case("synth_000").image_array[...], images[0])  # seeds differ
    for case in a:
        assert case.spacing == (2.5, 0.8, 0.8) and case.shape == (24, 48, 48)
        assert set(case.class_voxel_counts()) == {1, 2, 3}
        for value in (1, 2, 3):
            positions = case.class_locations(value)
            assert len(positions) > 0 and (case.label_array()[...][tuple(positions.T)] == value).all()
        group = zarr.open_group(case.path, mode="r")
        Image.from_zarr(group)
        ImageLabel.from_zarr(group["labels/segmentation"])
    hu = a.statistics["foreground_intensity"]
    assert 20 < hu["mean"] < 120 and hu["samples"] > 1000  # soft-tissue organs
    again = synth(tmp_path / "a", "--cases", "3", "--seed", "3")
    assert "1 converted, 2 already complete" in again.stdout


def test_a_synthetic_case_exports_with_its_spacing(tmp_path):
    assert synth(tmp_path / "a", "--cases", "1").returncode == 0
    export_case(tmp_path / "a", "synth_000", tmp_path / "synth.nii.gz")
    image = sitk.ReadImage(str(tmp_path / "synth.nii.gz"))
    assert image.GetSpacing() == pytest.approx((0.8, 0.8, 2.5))  # NIfTI stores float32
    stored = open_dataset(tmp_path / "a").case("synth_000").image_array[...]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), stored)


def test_synth_rejects_bad_arguments_by_name(tmp_path, capsys):
    code, error = run_cli(["synth", "--out", tmp_path / "a", "--shape", "24", "48", "48", "--cases", "0"], capsys)
    assert code == 2 and "--cases: expected a positive number" in error and "\n" not in error
    code, error = run_cli(["synth", "--out", tmp_path / "b", "--cases", "1", "--spacing", "0", "1", "1"], capsys)
    assert code == 2 and "spacing must be 3 positive finite floats" in error and "\n" not in error
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
