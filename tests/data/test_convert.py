"""Conversion from NIfTI / NRRD / MHA / DICOM into the dataset, export back, and every bad input's error."""

import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import zarr
from ome_zarr_models.v05 import Image, ImageLabel

from iunet3d.data import CaseJob, DataError, export_case, open_dataset, pair_case_files, run_conversion
from iunet3d.data.dataset_root import dataset_lock
from tests.helpers.cli import run_cli
from tests.helpers.data import oblique_affine, random_ct, save_nifti, write_dicom_series

SHAPE_IJK = (20, 26, 18)  # file order; axis i is the coarse one


def convert_one(tmp_path, image, label=None, case="c1", classes=None):  # raises the case's error
    report = run_conversion([CaseJob(case, image, label)], tmp_path / "ds", class_names=classes, progress=False)
    if report.failed:
        raise DataError(report.failed[case])
    return open_dataset(tmp_path / "ds")


def test_nifti_round_trip_keeps_voxels_and_oblique_anisotropic_affine(tmp_path):
    affine = oblique_affine()
    image, label = random_ct(SHAPE_IJK)
    save_nifti(tmp_path / "img.nii.gz", image, affine)
    save_nifti(tmp_path / "lab.nii.gz", label, affine)
    dataset = convert_one(tmp_path, tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")
    case = dataset.case("c1")
    # Stored canonically: file axis i (inferior, 2.5 mm) became z, flipped to run superior.
    assert case.shape == (20, 26, 18) and case.spacing == pytest.approx((2.5, 0.7, 0.8))
    assert np.all(np.diag(case.geometry.matrix()) > 0.9)  # only the 0.3 rad rotation is left
    group = zarr.open_group(case.path, mode="r")
    Image.from_zarr(group)  # an independent OME-Zarr 0.5 validator
    ImageLabel.from_zarr(group["labels/segmentation"])
    # File axes (i, j, k) ran inferior, anterior, right: all three are flipped to run S, P, L (LPS).
    np.testing.assert_array_equal(case.image_array[...], image[::-1, ::-1, ::-1])
    export_case(tmp_path / "ds", "c1", tmp_path / "back.nii.gz")
    export_case(tmp_path / "ds", "c1", tmp_path / "back_label.nii.gz", label="segmentation")
    back, back_label = nib.load(tmp_path / "back.nii.gz"), nib.load(tmp_path / "back_label.nii.gz")
    np.testing.assert_array_equal(np.asarray(back.dataobj), image)
    np.testing.assert_array_equal(np.asarray(back_label.dataobj), label)
    assert back.get_data_dtype() == np.int16 and back_label.get_data_dtype() == np.uint8
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    np.testing.assert_allclose(back_label.affine, affine, atol=1e-5)


def test_canonical_array_is_the_file_array_reoriented_to_lps(tmp_path):
    """Physical position of every stored voxel equals that of the file voxel it came from."""
    affine = oblique_affine(angle=0.0)
    image, _ = random_ct(SHAPE_IJK, seed=3)
    save_nifti(tmp_path / "img.nii", image, affine)
    case = convert_one(tmp_path, tmp_path / "img.nii").case("c1")
    stored = case.image_array[...]
    ras_to_lps = np.diag([-1, -1, 1, 1])
    file_index_to_lps = ras_to_lps @ affine
    rng = np.random.default_rng(0)
    for _ in range(20):
        zyx = [int(rng.integers(n)) for n in stored.shape]
        point = case.affine @ [*zyx, 1]
        ijk = np.linalg.solve(file_index_to_lps, point)
        assert np.allclose(ijk, np.round(ijk), atol=1e-4)
        assert stored[tuple(zyx)] == image[tuple(np.round(ijk[:3]).astype(int))]


def test_dicom_series_written_by_simpleitk_converts_with_its_geometry(tmp_path):
    volume = np.random.default_rng(1).integers(-1000, 2000, size=(12, 24, 20), dtype=np.int16)
    series = write_dicom_series(tmp_path / "series", volume, (0.7, 0.7, 2.5), (-50.0, 20.0, 100.0))
    case = convert_one(tmp_path, series).case("c1")
    np.testing.assert_array_equal(case.image_array[...], volume)
    assert case.spacing == pytest.approx((2.5, 0.7, 0.7))
    assert case.origin == pytest.approx((100.0, 20.0, -50.0))
    export_case(tmp_path / "ds", "c1", tmp_path / "back.nii.gz")
    back = sitk.ReadImage(str(tmp_path / "back.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), volume)
    assert back.GetSpacing() == pytest.approx((0.7, 0.7, 2.5))
    jobs, _ = pair_case_files(tmp_path, None)  # in batch mode a series directory is a case
    assert [(job.case, job.image) for job in jobs if job.case == "series"] == [("series", series)]


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nrrd_and_mha_round_trip(tmp_path, suffix):
    image, label = random_ct((14, 22, 16), seed=2)
    for name, array in (("img", image), ("lab", label)):
        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing((0.8, 0.8, 3.0))
        itk.SetOrigin((1.5, -2.0, 7.0))
        itk.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))  # axes swapped, one flipped
        sitk.WriteImage(itk, str(tmp_path / f"{name}{suffix}"))
    case = convert_one(tmp_path, tmp_path / f"img{suffix}", tmp_path / f"lab{suffix}").case("c1")
    assert np.allclose(case.geometry.matrix(), np.eye(3))
    export_case(tmp_path / "ds", "c1", tmp_path / f"back{suffix}")
    back = sitk.ReadImage(str(tmp_path / f"back{suffix}"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), image)
    assert back.GetDirection() == (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    assert back.GetOrigin() == pytest.approx((1.5, -2.0, 7.0)) and back.GetSpacing() == pytest.approx((0.8, 0.8, 3.0))


def _write(path, array, spacing=(0.8, 0.8, 2.5)):
    itk = sitk.GetImageFromArray(array)
    itk.SetSpacing(spacing)
    sitk.WriteImage(itk, str(path))
    return path


def _bad_inputs(tmp_path):
    good, label = random_ct((10, 12, 14))
    img = _write(tmp_path / "img.nii.gz", good)
    nan = good.astype(np.float32)
    nan[3, 4, 5] = np.nan
    (tmp_path / "garbage.nii.gz").write_bytes(b"\x1f\x8b this is not gzip")
    lab = {f"l{i}": tmp_path / f"l{i}.nii.gz" for i in range(1, 6)}
    return {
        "missing file": (tmp_path / "nope.nii.gz", None, "nope.nii.gz: image file not found"),
        "unreadable file": (tmp_path / "garbage.nii.gz", None, "garbage.nii.gz: cannot read image"),
        "shape mismatch": (img, _write(lab["l1"], label[:, :, :7]), r"l1.nii.gz: label shape \(10, 12, 7\)"),
        "spacing mismatch": (img, _write(lab["l2"], label, (0.8, 0.8, 3.0)), "l2.nii.gz: label spacing"),
        "negative labels": (img, _write(lab["l3"], label.astype(np.int16) - 1), r"l3.nii.gz: label .* -1\.\.2"),
        "fractional labels": (img, _write(lab["l4"], label * 0.5), "l4.nii.gz: label values must be small"),
        "huge labels": (img, _write(lab["l5"], label.astype(np.int16) * 200), r"l5.nii.gz: .*found 0\.\.600"),
        "NaN intensities": (_write(tmp_path / "nan.nii.gz", nan), None, r"nan.nii.gz: image has NaN/inf"),
        "2D image": (_write(tmp_path / "flat.nii.gz", good[0]), None, r"flat.nii.gz: image is 14x12 \(2D\)"),
        "out of int16": (_write(tmp_path / "big.nii.gz", good.astype(np.int32) * 40), None, "big.nii.gz: .* int16"),
    }


@pytest.mark.parametrize(
    "problem",
    ["missing file", "unreadable file", "shape mismatch", "spacing mismatch", "negative labels",
     "fractional labels", "huge labels", "NaN intensities", "2D image", "out of int16"],
)  # fmt: skip
def test_bad_input_names_the_file_and_the_problem_and_writes_nothing(tmp_path, problem):
    image, label, message = _bad_inputs(tmp_path)[problem]
    with pytest.raises(DataError, match=message):
        convert_one(tmp_path, image, label)
    assert not (tmp_path / "ds").exists()  # the dataset it would have created is not left behind, empty


def test_label_values_beyond_the_class_names_are_refused(tmp_path):
    image, label = random_ct((10, 12, 14))
    _write(tmp_path / "img.nii.gz", image)
    _write(tmp_path / "lab.nii.gz", label)
    with pytest.raises(DataError, match="label value 3 but the dataset has 3 classes"):
        convert_one(tmp_path, tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", classes=["background", "a", "b"])
    convert_one(tmp_path, tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", classes=["background", "x", "y", "z"])
    with pytest.raises(DataError, match="differ from the dataset's class names"):
        convert_one(tmp_path, tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", classes=["background", "a", "b", "c"])


def _batch(tmp_path, count=4):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for i in range(count):
        image, label = random_ct((10, 12, 14), seed=i)
        _write(images / f"case{i}_0000.nii.gz", image)  # nnU-Net naming
        _write(labels / f"case{i}.nii.gz", label)
    return images, labels


def test_batch_conversion_pairs_by_name_reports_failures_and_resumes(tmp_path):
    images, labels = _batch(tmp_path)
    (images / "case1_0000.nii.gz").write_bytes(b"broken")
    _write(images / "orphan.nii.gz", random_ct((10, 12, 14))[0])
    jobs, problems = pair_case_files(images, labels)
    assert [job.case for job in jobs] == ["case0", "case1", "case2", "case3"]
    assert "orphan" in problems and "no label file named orphan" in problems["orphan"]
    report = run_conversion(jobs, tmp_path / "ds", workers=2, progress=False)
    assert sorted(report.converted) == ["case0", "case2", "case3"]
    assert list(report.failed) == ["case1"] and "case1_0000.nii.gz: cannot read image" in report.failed["case1"]
    assert open_dataset(tmp_path / "ds").case_names == ["case0", "case2", "case3"]
    _write(images / "case1_0000.nii.gz", random_ct((10, 12, 14), seed=1)[0])  # fixed: rerun converts only it
    again = run_conversion(jobs, tmp_path / "ds", workers=2, progress=False)
    assert again.converted == ["case1"] and sorted(again.skipped) == ["case0", "case2", "case3"]
    assert open_dataset(tmp_path / "ds").class_names == ["background", "class_1", "class_2", "class_3"]


def test_empty_input_directory_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no image files found"):
        pair_case_files(tmp_path / "empty", None)


@pytest.mark.slow
def test_cli_batch_exit_code_and_summary(tmp_path):
    images, labels = _batch(tmp_path, count=2)
    (labels / "case1.nii.gz").write_bytes(b"broken")
    command = [sys.executable, "-m", "iunet3d", "convert", "--images", str(images), "--labels", str(labels),
               "--out", str(tmp_path / "ds"), "--classes", "background,a,b,c", "--no-progress"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1
    assert "1 converted, 0 already complete, 1 failed" in result.stdout
    assert "FAILED case1:" in result.stderr and "case1.nii.gz: cannot read label" in result.stderr
    assert "Traceback" not in result.stderr
    info = subprocess.run(
        [sys.executable, "-m", "iunet3d", "info", str(tmp_path / "ds")], capture_output=True, text=True
    )
    assert info.returncode == 0 and "1 cases, classes: background, a, b, c" in info.stdout and "case0" in info.stdout
    single = subprocess.run(
        [sys.executable, "-m", "iunet3d", "convert", "--image", str(images / "nope.nii.gz"), "--case", "x",
         "--out", str(tmp_path / "new")], capture_output=True, text=True, encoding="utf-8")  # fmt: skip
    assert single.returncode == 2 and "nope.nii.gz: image file not found" in single.stderr
    assert not (tmp_path / "new").exists()  # nothing created for a mistyped input


def test_a_killed_conversion_leaves_no_complete_looking_case(tmp_path):
    """SIGKILL while the case is being written: no case directory, not listed; a rerun completes it."""
    image = np.random.default_rng(0).integers(-1000, 2000, size=(96, 256, 256), dtype=np.int16)  # incompressible
    _write(tmp_path / "big.nii", image)
    script = (
        "import sys; from pathlib import Path; from iunet3d.data import CaseJob, run_conversion; "
        "run_conversion([CaseJob('big', Path(sys.argv[1]))], sys.argv[2], progress=False)"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "big.nii"), str(tmp_path / "ds")])
    partial_chunks = tmp_path / "ds" / ".partial" / "big" / "0" / "c"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (partial_chunks.exists() and any(partial_chunks.rglob("*"))):
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert partial_chunks.exists(), "the conversion finished before it could be killed"
    assert not (tmp_path / "ds" / "big").exists()
    assert "big" not in open_dataset(tmp_path / "ds").case_names
    report = run_conversion([CaseJob("big", tmp_path / "big.nii")], tmp_path / "ds", progress=False)
    assert report.converted == ["big"] and not (tmp_path / "ds" / ".partial").exists()
    np.testing.assert_array_equal(open_dataset(tmp_path / "ds").case("big").image_array[...], image)


def test_a_second_writer_is_refused_while_a_conversion_holds_the_dataset(tmp_path):
    image, _ = random_ct((10, 12, 14))
    _write(tmp_path / "img.nii.gz", image)
    convert_one(tmp_path, tmp_path / "img.nii.gz")
    with dataset_lock(tmp_path / "ds"), pytest.raises(DataError, match="another conversion is writing"):
        run_conversion([CaseJob("c2", tmp_path / "img.nii.gz")], tmp_path / "ds", progress=False)
    assert open_dataset(tmp_path / "ds").case_names == ["c1"]


def test_class_names_given_later_must_cover_the_stored_labels(tmp_path):
    image, label = random_ct((10, 12, 14))  # label values 0..3
    _write(tmp_path / "img.nii.gz", image)
    _write(tmp_path / "lab.nii.gz", label)
    convert_one(tmp_path, tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")
    with pytest.raises(DataError, match="--classes: 2 names .* case c1 .* already holds label value 3"):
        convert_one(tmp_path, tmp_path / "img.nii.gz", case="c2", classes=["background", "liver"])


def test_a_bad_case_name_fails_only_that_case(tmp_path):
    images, labels = _batch(tmp_path, count=2)
    (images / "pt 7_0000.nii.gz").write_bytes((images / "case0_0000.nii.gz").read_bytes())
    (labels / "pt 7.nii.gz").write_bytes((labels / "case0.nii.gz").read_bytes())
    jobs, _ = pair_case_files(images, labels)
    report = run_conversion(jobs, tmp_path / "ds", progress=False)
    assert sorted(report.converted) == ["case0", "case1"]
    assert list(report.failed) == ["pt 7"] and "case name 'pt 7'" in report.failed["pt 7"]


def test_ambiguous_or_damaged_nifti_headers_are_refused(tmp_path):
    image, label = random_ct((10, 12, 14))
    nifti = nib.Nifti1Image(image, oblique_affine())
    nifti.set_qform(np.diag([2.5, 0.7, 0.8, 1.0]), code=1)  # qform says axis-aligned, sform oblique
    nifti.set_sform(oblique_affine(), code=2)
    nib.save(nifti, tmp_path / "ambiguous.nii.gz")
    with pytest.raises(
        DataError, match=r"ambiguous.nii.gz: ambiguous NIfTI orientation \(sform_code=2, qform_code=1\)"
    ):
        convert_one(tmp_path, tmp_path / "ambiguous.nii.gz")
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "plain.nii")
    (tmp_path / "plain.nii").rename(tmp_path / "not_gzipped.nii.gz")  # readable by ITK, misnamed
    with pytest.raises(DataError, match="not_gzipped.nii.gz: cannot check the NIfTI header"):
        convert_one(tmp_path, tmp_path / "not_gzipped.nii.gz")
    nan_label = label.astype(np.float32)
    nan_label[0, 0, 0] = np.nan  # ITK would read it as 0
    save_nifti(tmp_path / "img.nii.gz", image, np.eye(4))
    save_nifti(tmp_path / "nan_label.nii.gz", nan_label, np.eye(4))
    with pytest.raises(DataError, match=r"nan_label.nii.gz: label has NaN/inf values \(1 voxels\)"):
        convert_one(tmp_path, tmp_path / "img.nii.gz", tmp_path / "nan_label.nii.gz")


def test_other_formats_simpleitk_reads_convert_too(tmp_path):
    image, _ = random_ct((10, 12, 14))
    _write(tmp_path / "volume.vtk", image)
    case = convert_one(tmp_path, tmp_path / "volume.vtk").case("c1")
    np.testing.assert_array_equal(case.image_array[...], image)


def test_cli_output_path_problems_are_one_line_errors(tmp_path, capsys):
    image, _ = random_ct((10, 12, 14))
    _write(tmp_path / "img.nii.gz", image)
    (tmp_path / "a_file").write_text("x")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "sub"):
        code, error = run_cli(["convert", "--image", tmp_path / "img.nii.gz", "--case", "c", "--out", out,
                               "--no-progress"], capsys)  # fmt: skip
        assert code == 2 and f"{out}: " in error and "\n" not in error, error
