"""Data safety: metadata that could point outside the dataset, user data that is never replaced, inputs that
are not silently mixed up, failed first runs that leave nothing, lost chunk files, stale root indexes and
write errors that name the case and the file."""

import contextlib
import json
import resource
import signal

import nibabel as nib
import numpy as np
import pytest
import zarr

from iunet3d.cli import main as cli
from iunet3d.data import CaseJob, DataError, StorageOptions, open_dataset, run_conversion
from iunet3d.data.case_writer import ALL_CHUNKS_WRITTEN
from iunet3d.data.storage import selection_bounds
from tests.helpers.data import random_ct, store_case

SMALL_CHUNKS = StorageOptions(chunk=16, coarse_chunk=8)
SHAPE = (16, 32, 32)  # with spacing (2.5, 0.8, 0.8): chunks (8, 16, 16), a 2 x 2 x 2 grid


def _edit_metadata(path, edit) -> None:
    """Rewrite the zarr.json at ``path`` (a group) through ``edit(attributes["iunet3d"])``, as a user would."""
    metadata = json.loads((path / "zarr.json").read_text())
    edit(metadata["attributes"]["iunet3d"])
    (path / "zarr.json").write_text(json.dumps(metadata))


def _save(path, array) -> None:
    nib.save(nib.Nifti1Image(array, np.diag([0.8, 0.8, 2.5, 1.0])), str(path))


@pytest.fixture
def two_cases(tmp_path):
    root = tmp_path / "ds"
    for index in range(2):
        image, label = random_ct(SHAPE, seed=index)
        image[:8, :16, :16] = -1024  # one image chunk all air (the fill value); most label chunks hold zeros
        store_case(root, f"c{index}", image, label, options=SMALL_CHUNKS)
    return root


# 1. Case names read from metadata


@pytest.mark.parametrize("name", ["../x", "/tmp/abs", "a b", ""])
def test_case_names_in_the_root_list_are_checked_like_on_the_command_line(two_cases, name):
    _edit_metadata(two_cases, lambda info: info["cases"][0].update(name=name))
    with pytest.raises(DataError, match=rf"^{two_cases}: bad entry in the case list .*case name {name!r}"):
        open_dataset(two_cases)


@pytest.mark.parametrize("name", ["../x", "/tmp/abs", "c1"])
def test_a_cases_own_name_must_be_valid_and_its_directory_name(two_cases, name):
    _edit_metadata(two_cases / "c0", lambda info: info.update(name=name))
    expected = "bad iunet3d.name" if name != "c1" else "says its name is 'c1'"
    with pytest.raises(DataError, match=rf"^{two_cases}: case directory '?c0'?.*{expected}"):
        open_dataset(two_cases).case("c0")
    assert open_dataset(two_cases).case("c1").name == "c1"  # the other case is fine


# 2. A user's directory is never replaced


def test_a_user_directory_named_like_the_case_survives_a_refused_conversion(tmp_path, two_cases):
    image, _ = random_ct(SHAPE)
    _save(tmp_path / "img.nii.gz", image)
    (two_cases / "X").mkdir()
    (two_cases / "X" / "notes.txt").write_text("my notes")
    with pytest.raises(SystemExit) as exit_info:
        cli(["convert", "--image", str(tmp_path / "img.nii.gz"), "--case", "X", "--out", str(two_cases)])
    assert exit_info.value.code == 2
    assert (two_cases / "X" / "notes.txt").read_text() == "my notes"
    assert not (two_cases / ".partial").exists()
    assert open_dataset(two_cases).case_names == ["c0", "c1"]


def test_the_refusal_names_the_directory(tmp_path, two_cases):
    image, _ = random_ct(SHAPE)
    _save(tmp_path / "img.nii.gz", image)
    (two_cases / "X").mkdir()
    (two_cases / "X" / "notes.txt").write_text("my notes")
    report = run_conversion([CaseJob("X", tmp_path / "img.nii.gz")], two_cases, progress=False)
    assert report.converted == [] and f"{two_cases / 'X'}: exists and is not an iunet3d case" in report.failed["X"]


# 3. A case converted from other files is not silently kept or replaced


def test_reconverting_a_case_from_another_file_is_refused_unless_overwrite(tmp_path):
    first, second = random_ct(SHAPE, seed=1)[0], random_ct(SHAPE, seed=2)[0]
    _save(tmp_path / "a.nii.gz", first)
    _save(tmp_path / "b.nii.gz", second)
    out = tmp_path / "ds"
    assert run_conversion([CaseJob("c", tmp_path / "a.nii.gz")], out, progress=False).converted == ["c"]
    again = run_conversion([CaseJob("c", tmp_path / "a.nii.gz")], out, progress=False)
    assert again.skipped == ["c"] and not again.failed  # same file: resumed, not converted again
    other = run_conversion([CaseJob("c", tmp_path / "b.nii.gz")], out, progress=False)
    assert other.skipped == [] and other.converted == []
    assert str(tmp_path / "a.nii.gz") in other.failed["c"] and str(tmp_path / "b.nii.gz") in other.failed["c"]
    assert "--overwrite" in other.failed["c"]

    def stored_voxels():  # sorted: the stored array is the file's, reoriented
        return np.sort(open_dataset(out).case("c").image_array[...], axis=None)

    np.testing.assert_array_equal(stored_voxels(), np.sort(first, axis=None))  # the refusal kept the first
    replaced = run_conversion([CaseJob("c", tmp_path / "b.nii.gz")], out, progress=False, overwrite=True)
    assert replaced.converted == ["c"] and not replaced.failed
    np.testing.assert_array_equal(stored_voxels(), np.sort(second, axis=None))
    assert open_dataset(out).case("c").info["source"]["image"] == str(tmp_path / "b.nii.gz")
    assert not (out / ".partial").exists()


def test_the_convert_command_takes_overwrite(tmp_path):
    image, _ = random_ct(SHAPE)
    _save(tmp_path / "a.nii.gz", image)
    _save(tmp_path / "b.nii.gz", image + 1)
    base = ["convert", "--case", "c", "--out", str(tmp_path / "ds"), "--no-progress", "--workers", "1"]
    assert cli([*base, "--image", str(tmp_path / "a.nii.gz")]) == 0
    with pytest.raises(SystemExit):
        cli([*base, "--image", str(tmp_path / "b.nii.gz")])
    assert cli([*base, "--image", str(tmp_path / "b.nii.gz"), "--overwrite"]) == 0
    assert open_dataset(tmp_path / "ds").case("c").info["source"]["image"] == str(tmp_path / "b.nii.gz")


def test_a_synthetic_case_made_with_other_options_is_refused_unless_overwrite(tmp_path):
    def job(seed):
        return CaseJob("s", synthetic={"shape": (8, 16, 16), "spacing": (2.5, 0.8, 0.8), "seed": [seed, 0]})

    assert run_conversion([job(1)], tmp_path / "ds", progress=False).converted == ["s"]
    assert run_conversion([job(1)], tmp_path / "ds", progress=False).skipped == ["s"]
    refused = run_conversion([job(2)], tmp_path / "ds", progress=False)
    assert "converted from phantom" in refused.failed["s"] and "'seed': [2, 0]" in refused.failed["s"]
    assert run_conversion([job(2)], tmp_path / "ds", progress=False, overwrite=True).converted == ["s"]
    assert open_dataset(tmp_path / "ds").case("s").info["source"]["synthetic"]["seed"] == [2, 0]


# 4. A failed first conversion leaves nothing behind


def test_a_failed_first_conversion_leaves_no_dataset_to_constrain_the_rerun(tmp_path):
    image, label = random_ct(SHAPE)  # label values 0..3
    _save(tmp_path / "img.nii.gz", image)
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    out = tmp_path / "new" / "ds"
    failed = run_conversion([CaseJob("c", tmp_path / "img.nii.gz", tmp_path / "bad.nii.gz")], out,
                            class_names=["background", "a"], progress=False)  # fmt: skip
    assert list(failed.failed) == ["c"] and not out.exists()
    _save(tmp_path / "lab.nii.gz", label)
    fixed = run_conversion([CaseJob("c", tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")], out,
                           class_names=["background", "x", "y", "z"], progress=False)  # fmt: skip
    assert fixed.converted == ["c"] and open_dataset(out).class_names == ["background", "x", "y", "z"]


def test_a_directory_the_user_made_is_kept_but_emptied_of_what_the_run_wrote(tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    (tmp_path / "ds").mkdir()
    report = run_conversion([CaseJob("c", tmp_path / "bad.nii.gz")], tmp_path / "ds", progress=False)
    assert list(report.failed) == ["c"] and list((tmp_path / "ds").iterdir()) == []


def test_an_existing_dataset_stays_after_a_failed_run(tmp_path, two_cases):
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    report = run_conversion([CaseJob("c9", tmp_path / "bad.nii.gz")], two_cases, progress=False)
    assert list(report.failed) == ["c9"] and open_dataset(two_cases).case_names == ["c0", "c1"]


# 5. Lost chunk files are detected


def _chunk_files(array_dir):
    return sorted(f for f in (array_dir / "c").rglob("*") if f.is_file())


def test_every_chunk_is_written_and_recorded(two_cases):
    case = open_dataset(two_cases).case("c0")
    assert case.info["storage"][ALL_CHUNKS_WRITTEN] == ["0", "labels/segmentation/0"]
    for key in ("0", "labels/segmentation/0"):
        assert len(_chunk_files(two_cases / "c0" / key)) == 8  # also the all-air and all-background chunks
    assert (case.read_image((0, 0, 0), (8, 16, 16)) == -1024).all()


def test_a_lost_image_chunk_fails_patch_reads_and_whole_array_reads_naming_the_case(two_cases):
    (two_cases / "c0" / "0" / "c" / "1" / "0" / "1").unlink()  # chunk z 8:16, y 0:16, x 16:32
    case = open_dataset(two_cases).case("c0")
    expected = rf"case c0: image array {two_cases / 'c0' / '0'}: chunk file c/1/0/1 is missing"
    with pytest.raises(DataError, match=rf"{expected} \(reading region \[8:12, 0:16, 16:20\]\)"):
        case.read_image((8, -4, 16), (4, 20, 4))
    case.read_image((0, 0, 0), (8, 32, 32))
    with pytest.raises(DataError, match=rf"{expected} \(reading region \[0:16, 0:32, 0:32\]\)"):
        case.image_array[...]
    with pytest.raises(DataError, match=expected):
        np.asarray(case.image_array)
    assert case.image_array.shape == SHAPE and case.image_array.chunks == (8, 16, 16)
    assert case.image_array.dtype == np.int16
    image, _ = random_ct(SHAPE, seed=0)
    image[:8, :16, :16] = -1024
    np.testing.assert_array_equal(case.image_array[0:8, 3], image[0:8, 3])  # slices clear of it still read
    case.read_label((0, 0, 0), SHAPE)  # the label is whole


def test_a_lost_label_chunk_fails_label_reads(two_cases):
    (two_cases / "c1" / "labels" / "segmentation" / "0" / "c" / "0" / "1" / "1").unlink()
    case = open_dataset(two_cases).case("c1")
    expected = r"case c1: label 'segmentation' array .*: chunk file c/0/1/1 is missing"
    with pytest.raises(DataError, match=expected):
        case.read_label((4, 20, 20), (2, 2, 2))
    with pytest.raises(DataError, match=expected):
        case.label_array()[:, 16:, 16:]
    case.read_image((0, 0, 0), SHAPE)


def test_a_training_patch_over_a_lost_chunk_fails_naming_the_case(two_cases):
    from iunet3d.data import CTNormalization
    from iunet3d.patches import PatchStream

    (two_cases / "c0" / "0" / "c" / "0" / "1" / "0").unlink()
    patches = PatchStream(two_cases, patch_size=(32, 64, 64), cases=["c0"], transform=None,
                          normalization=CTNormalization.window(-1000, 1000), num_patches=1)  # fmt: skip
    with pytest.raises(DataError, match=r"case c0: image array .*: chunk file c/0/1/0 is missing"):
        next(iter(patches))


def test_cases_written_before_the_record_are_read_as_before(two_cases):
    _edit_metadata(two_cases / "c0", lambda info: info["storage"].pop(ALL_CHUNKS_WRITTEN))
    (two_cases / "c0" / "0" / "c" / "0" / "0" / "0").unlink()
    case = open_dataset(two_cases).case("c0")
    assert isinstance(case.image_array, zarr.Array)
    assert (case.read_image((0, 0, 0), (8, 16, 16)) == -1024).all()  # zarr's fill value, as before


@pytest.mark.parametrize(
    ("selection", "bounds"),
    [
        ((...,), [(0, 16), (0, 32), (0, 32)]),
        ((3,), [(3, 4), (0, 32), (0, 32)]),
        ((-1, ..., slice(5, 9)), [(15, 16), (0, 32), (5, 9)]),
        ((slice(None, None, -1), slice(2, 30, 10), 0), [(0, 16), (2, 23), (0, 1)]),
        ((slice(20, 30),), [(0, 0), (0, 32), (0, 32)]),  # empty along z: nothing to read
        (([1, 2],), [(0, 16), (0, 32), (0, 32)]),  # fancy indexing: the whole array is checked
    ],
)
def test_selection_bounds_cover_what_a_selection_reads(selection, bounds):
    assert selection_bounds(selection, SHAPE) == bounds


# 6. A stale root index


def test_a_root_listing_fewer_cases_than_on_disk_uses_the_cases_on_disk(two_cases, capsys):
    _edit_metadata(two_cases, lambda info: info.update(cases=[], statistics={"cases": 0}))
    with pytest.warns(UserWarning, match="lists 0 cases but 2 complete cases are on disk"):
        dataset = open_dataset(two_cases)
    assert dataset.case_names == ["c0", "c1"] and dataset.statistics["cases"] == 2
    assert dataset.statistics["foreground_intensity"]["samples"] > 0
    with pytest.warns(UserWarning):
        assert cli(["info", str(two_cases)]) == 0
    out = capsys.readouterr().out
    assert "2 cases" in out and "c0 " in out and "c1 " in out
    run_conversion([], two_cases, progress=False)  # any writer rewrites the root under its lock
    root = json.loads((two_cases / "zarr.json").read_text())["attributes"]["iunet3d"]
    assert [entry["name"] for entry in root["cases"]] == ["c0", "c1"]


def test_a_root_listing_a_case_that_is_gone_drops_it(two_cases):
    _edit_metadata(two_cases, lambda info: info["cases"].append({**info["cases"][0], "name": "gone"}))
    with pytest.warns(UserWarning, match="lists 3 cases but 2 complete"):
        assert open_dataset(two_cases).case_names == ["c0", "c1"]


# 7. Write errors name the case and the file


@contextlib.contextmanager
def _file_size_limit(limit: int):
    """Writes beyond ``limit`` bytes of a file fail with EFBIG ("File too large"), as a full disk fails them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_a_write_error_names_the_case_and_the_path(tmp_path):
    image = np.random.default_rng(0).integers(-1000, 1000, size=(32, 64, 64), dtype=np.int16)  # incompressible
    _save(tmp_path / "img.nii", image)
    with _file_size_limit(32_000):  # metadata fits; a 64 KB chunk does not
        report = run_conversion([CaseJob("c1", tmp_path / "img.nii")], tmp_path / "ds", progress=False)
    message = report.failed["c1"]
    assert message.startswith(f"case c1: cannot write {tmp_path / 'ds' / '.partial' / 'c1' / '0'}")
    assert message.endswith(": File too large") and "\n" not in message
    assert not (tmp_path / "ds").exists()  # a first conversion that wrote no case leaves nothing
