"""The reader refuses cut files and DICOM series with broken geometry before ITK reads them, naming the file."""

import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from iunet3d.data import DataError
from iunet3d.data.image_files import load_case, read_volume
from tests.helpers.data import random_ct, save_nifti, write_dicom_series
from tests.helpers.dicom import AXIAL, axial_positions, cut, gzip_bytes, write_dicom_slices, write_multiframe

SHAPE = (12, 24, 20)  # (z, y, x)


def _volume(seed=0):
    return np.random.default_rng(seed).integers(-1000, 1500, size=SHAPE, dtype=np.int16)


def _write_sitk(path, array, compress=False):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


# --- cut and short files --------------------------------------------------------------------------------


def test_cut_nifti_gz_image_is_refused_though_itk_would_fill_it_with_zeros(tmp_path):
    image = cut(save_nifti(tmp_path / "img.nii.gz", _volume(), np.eye(4)))
    with pytest.raises(DataError, match=r"img\.nii\.gz: image file is truncated: its gzip stream stops") as error:
        load_case(image, None)
    assert "\n" not in str(error.value)


def test_cut_nifti_gz_label_is_refused_naming_the_label(tmp_path):
    volume, label = random_ct(SHAPE)
    image = save_nifti(tmp_path / "img.nii.gz", volume, np.eye(4))
    labels = cut(save_nifti(tmp_path / "lab.nii.gz", label, np.eye(4)), keep=0.9)
    with pytest.raises(DataError, match=r"lab\.nii\.gz: label file is truncated"):
        load_case(image, labels)


def test_cut_nii_is_refused_with_the_bytes_it_lacks(tmp_path):
    image = save_nifti(tmp_path / "img.nii", _volume(), np.eye(4))
    size = image.stat().st_size
    image.write_bytes(image.read_bytes()[: size - 100])
    expected = rf"img\.nii: image file is truncated: {size - 352 - 100} bytes of data where its header calls for "
    with pytest.raises(DataError, match=expected + rf"{int(np.prod(SHAPE)) * 2} \(12x24x20 voxels of int16\)"):
        load_case(image, None)


def test_complete_gzip_stream_of_a_short_nifti_is_refused(tmp_path):
    whole = save_nifti(tmp_path / "whole.nii", _volume(), np.eye(4)).read_bytes()
    image = gzip_bytes(tmp_path / "short.nii.gz", whole[:-2])  # the stream is intact, the voxels are not
    with pytest.raises(DataError, match=r"short\.nii\.gz: image file is truncated: 11518 bytes of data"):
        read_volume(image, "image")


@pytest.mark.parametrize(
    "name, compress",
    [("img.nrrd", False), ("img.nrrd", True), ("img.mha", False), ("img.mha", True), ("img.mhd", False),
     ("img.mhd", True)],
)  # fmt: skip
def test_cut_nrrd_and_metaimage_are_refused_naming_the_file(tmp_path, name, compress):
    header = _write_sitk(tmp_path / name, _volume(), compress)
    data = next(tmp_path.glob("img.*raw")) if name.endswith(".mhd") else header  # .mhd keeps its data apart
    cut(data)
    detached = rf" \(data file {data.name}\)" if data != header else ""
    with pytest.raises(DataError, match=rf"{name}{detached}: image file is truncated") as error:
        read_volume(header, "image")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name, compress", [("a.nii.gz", True), ("a.nii", False), ("a.nrrd", False),
                                            ("a.nrrd", True), ("a.mha", True), ("a.mhd", False)])  # fmt: skip
def test_intact_files_load_unchanged(tmp_path, name, compress):
    volume = _volume(seed=5)
    path = _write_sitk(tmp_path / name, volume, compress)
    case = load_case(path, None)
    np.testing.assert_array_equal(case.image, volume)
    assert case.geometry.spacing == pytest.approx((0.8, 0.8, 2.5))


def test_nrrd_with_detached_header_is_checked_against_its_data_file(tmp_path):
    volume = _volume()
    (tmp_path / "img.raw").write_bytes(volume.tobytes()[:-10])
    header = tmp_path / "img.nhdr"
    header.write_text(
        "NRRD0004\ntype: short\ndimension: 3\nsizes: 20 24 12\nendian: little\nencoding: raw\ndata file: img.raw\n"
    )
    with pytest.raises(DataError, match=r"img\.nhdr \(data file img\.raw\): image file is truncated"):
        read_volume(header, "image")
    (tmp_path / "img.raw").write_bytes(volume.tobytes())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_volume(header, "image")), volume)


@pytest.mark.parametrize("compress", [False, True], ids=["implicit-vr", "jpeg2000-encapsulated"])
def test_cut_dicom_slice_is_refused_naming_it(tmp_path, compress):
    positions = axial_positions(SHAPE[0], 2.0)
    series = write_dicom_slices(tmp_path / "series", _volume(), (0.7, 0.7), positions, compress=compress)
    cut(series / "slice_005.dcm", keep=0.8)  # GDCM alone would leave it out and stack the other 11 slices
    with pytest.raises(DataError, match=r"series/slice_005\.dcm: image DICOM file is truncated"):
        load_case(series, None)
    with pytest.raises(DataError, match=r"slice_005\.dcm: image DICOM file is truncated"):
        load_case(series / "slice_005.dcm", None)


def test_dicom_slice_whose_pixel_data_element_is_short_is_refused(tmp_path):
    series = write_dicom_series(tmp_path / "series", _volume(), (0.7, 0.7, 2.0), (0.0, 0.0, 0.0))
    data = (series / "slice_000.dcm").read_bytes()
    start = data.rindex(b"\xe0\x7f\x10\x00")  # Pixel Data; SimpleITK writes implicit VR little endian
    length = int.from_bytes(data[start + 4 : start + 8], "little")
    assert length == 24 * 20 * 2 and start + 8 + length == len(data)
    shortened = data[: start + 4] + (length - 100).to_bytes(4, "little") + data[start + 8 : -100]
    (series / "slice_000.dcm").write_bytes(shortened)  # consistent element, too few bytes for 24 x 20 pixels
    with pytest.raises(DataError, match=r"slice_000\.dcm: image DICOM file is truncated: 860 bytes of pixel data, "):
        load_case(series, None)


# --- DICOM series geometry --------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["implicit-vr", "jpeg2000-encapsulated"])
def test_correct_series_converts_in_slice_order_with_its_spacing(tmp_path, compress):
    volume = _volume(seed=2)
    positions = axial_positions(SHAPE[0], 2.0)
    # Files named against the slice order, and steps jittered well inside the tolerance (1% of 2 mm = 0.02 mm).
    positions = [(x, y, z + (0.005 if k % 2 else 0.0)) for k, (x, y, z) in enumerate(positions)][::-1]
    series = write_dicom_slices(tmp_path / "series", volume[::-1], (0.7, 0.7), positions, compress=compress)
    case = load_case(series, None)
    np.testing.assert_array_equal(case.image, volume)
    assert case.geometry.spacing == pytest.approx((0.7, 0.7, 2.0), abs=1e-3)
    assert case.geometry.origin == pytest.approx((-50.0, 20.0, 100.0))


def test_series_with_a_missing_slice_is_refused_naming_the_gap(tmp_path):
    series = write_dicom_series(tmp_path / "series", _volume(), (0.7, 0.7, 2.0), (0.0, 0.0, 0.0))
    (series / "slice_005.dcm").unlink()
    expected = r"series: gap between z=8\.00 and z=12\.00 mm \(slice_004\.dcm, slice_006\.dcm\) is 4\.00 mm, median "
    with pytest.raises(DataError, match=expected + r"spacing 2\.00 mm"):
        load_case(series, None)


def test_series_with_a_step_just_beyond_the_tolerance_is_refused(tmp_path):
    positions = axial_positions(SHAPE[0], 2.0)
    positions[6] = (positions[6][0], positions[6][1], positions[6][2] + 0.03)  # 0.03 mm > 1% of 2 mm
    series = write_dicom_slices(tmp_path / "series", _volume(), (0.7, 0.7), positions)
    with pytest.raises(DataError, match=r"gap between z=110\.00 and z=112\.03 mm .* is 2\.03 mm"):
        load_case(series, None)


def test_series_with_a_duplicated_slice_is_refused(tmp_path):
    series = write_dicom_series(tmp_path / "series", _volume(), (0.7, 0.7, 2.0), (0.0, 0.0, 0.0))
    shutil.copy(series / "slice_005.dcm", series / "slice_005_copy.dcm")
    with pytest.raises(DataError, match=r"series: slices slice_005\.dcm and slice_005_copy\.dcm are both at z=10\.00"):
        load_case(series, None)


def test_series_with_mixed_orientations_is_refused(tmp_path):
    orientations = [AXIAL] * SHAPE[0]
    orientations[4] = (1.0, 0.0, 0.0, 0.0, 0.8, 0.6)
    series = write_dicom_slices(
        tmp_path / "series", _volume(), (0.7, 0.7), axial_positions(SHAPE[0], 2.0), orientations
    )
    with pytest.raises(DataError, match=r"series: slice slice_004\.dcm has orientation \(1, 0, 0, 0, 0\.8, 0\.6\)"):
        load_case(series, None)


def test_series_sheared_by_a_gantry_tilt_is_refused(tmp_path):
    positions = [(x, y + 0.5 * k, z) for k, (x, y, z) in enumerate(axial_positions(SHAPE[0], 2.0))]
    series = write_dicom_slices(tmp_path / "series", _volume(), (0.7, 0.7), positions)
    with pytest.raises(DataError, match=r"series: slice slice_001\.dcm lies 0\.50 mm off the slice normal"):
        load_case(series, None)


# --- multi-frame DICOM ----------------------------------------------------------------------------------


def test_directory_holding_one_multiframe_file_reads_as_that_file(tmp_path):
    volume = np.abs(_volume(seed=3))
    file = write_multiframe(tmp_path / "series" / "volume.dcm", volume, (0.7, 0.7, 2.0), (1.0, 2.0, 3.0))
    from_directory, from_file = load_case(tmp_path / "series", None), load_case(file, None)
    np.testing.assert_array_equal(from_directory.image, volume)
    np.testing.assert_array_equal(from_file.image, volume)
    assert from_directory.geometry == from_file.geometry
    assert from_directory.geometry.spacing == pytest.approx((0.7, 0.7, 2.0))


def test_cut_multiframe_file_in_a_directory_is_refused_naming_it(tmp_path):
    write_multiframe(tmp_path / "series" / "volume.dcm", np.abs(_volume()), (0.7, 0.7, 2.0), (0.0, 0.0, 0.0))
    cut(tmp_path / "series" / "volume.dcm", keep=0.99)
    with pytest.raises(DataError, match=r"series/volume\.dcm: image DICOM file is truncated"):
        load_case(tmp_path / "series", None)
