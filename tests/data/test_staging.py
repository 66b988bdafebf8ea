"""All-or-nothing writes: the atomic file writer and staged case directories."""

import pytest
import zarr

from iunet3d.data import DataError
from iunet3d.data.staging import (
    PARTIAL_DIR,
    TEMPORARY_PREFIX,
    atomic_path,
    atomic_write,
    check_inside,
    is_complete_case,
    remove_temporaries,
    staged_case,
    write_text_atomically,
)


def _case(path, attributes=None):
    """A minimal case directory: a group with an array at ``0``."""
    group = zarr.open_group(path, mode="w", zarr_format=3, attributes={"iunet3d": attributes or {}})
    group.create_array("0", shape=(2, 2, 2), dtype="int16", fill_value=0)
    return group


def test_atomic_write_replaces_the_whole_file_or_leaves_the_old_one(tmp_path):
    target = tmp_path / "state.json"
    write_text_atomically(target, "old")

    def failing(file):
        file.write(b"half of the new")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left
    write_text_atomically(target, "new")
    assert target.read_text() == "new"


def test_atomic_path_hands_a_writer_a_name_with_the_final_suffixes(tmp_path):
    target = tmp_path / "case.nii.gz"
    with atomic_path(target) as temporary:
        assert temporary.parent == tmp_path and temporary.name.startswith(TEMPORARY_PREFIX)
        assert temporary.name.endswith(".nii.gz")  # libraries pick the format from the suffix
        assert not target.exists()
        temporary.write_bytes(b"image")
    assert target.read_bytes() == b"image" and not temporary.exists()


def test_only_the_temporary_files_of_atomic_writes_are_removed_as_leftovers(tmp_path):
    (tmp_path / "case").mkdir()
    (tmp_path / f"{TEMPORARY_PREFIX}123-zarr.json").write_text("{half")  # what a kill mid-write leaves
    kept = [tmp_path / "zarr.json", tmp_path / f"{TEMPORARY_PREFIX}notes", tmp_path / ".tmp-x-y"]
    for path in kept:
        path.write_text("a user's")
    (tmp_path / f"{TEMPORARY_PREFIX}7-dir").mkdir()  # not a file: not ours
    (tmp_path / f"{TEMPORARY_PREFIX}8-link").symlink_to(tmp_path / "zarr.json")
    remove_temporaries(tmp_path, tmp_path)
    remaining = sorted(p.name for p in tmp_path.iterdir())
    assert remaining == sorted(
        ["case", f"{TEMPORARY_PREFIX}7-dir", f"{TEMPORARY_PREFIX}8-link", *(p.name for p in kept)]
    )
    with pytest.raises(DataError, match="outside"):
        remove_temporaries(tmp_path.parent, tmp_path)


def test_a_staged_case_appears_complete_only_when_its_block_ends(tmp_path):
    with staged_case(tmp_path, "c1") as partial:
        assert partial == tmp_path / PARTIAL_DIR / "c1"
        _case(partial, {"name": "c1"})
        assert not (tmp_path / "c1").exists() and not is_complete_case(partial)
    final = tmp_path / "c1"
    assert is_complete_case(final)
    assert zarr.open_group(final, mode="r").attrs["iunet3d"] == {"name": "c1", "complete": True}
    assert not (tmp_path / PARTIAL_DIR).exists()


def test_a_failed_staging_leaves_only_a_partial_directory_which_the_next_run_replaces(tmp_path):
    with pytest.raises(RuntimeError), staged_case(tmp_path, "c1") as partial:
        _case(partial)
        raise RuntimeError("killed")
    assert not (tmp_path / "c1").exists() and (tmp_path / PARTIAL_DIR / "c1").exists()
    with staged_case(tmp_path, "c1") as partial:
        assert not partial.exists()  # the leftover was removed before writing again
        _case(partial, {"try": 2})
    assert zarr.open_group(tmp_path / "c1", mode="r").attrs["iunet3d"]["try"] == 2


def test_a_staged_copy_is_incomplete_until_its_block_ends(tmp_path):
    source = tmp_path / "source"
    _case(source, {"name": "c1", "complete": True})
    out = tmp_path / "out"
    with staged_case(out, "c1", copy_of=source) as partial:
        assert (partial / "0" / "zarr.json").is_file()
        assert not is_complete_case(partial)  # the copied "complete" flag is cleared until the end
    assert is_complete_case(out / "c1") and is_complete_case(source)


def test_a_symlinked_partial_directory_is_refused_and_its_target_untouched(tmp_path):
    dataset, elsewhere = tmp_path / "dataset", tmp_path / "elsewhere"
    (elsewhere / "c1").mkdir(parents=True)
    (elsewhere / "c1" / "keep.txt").write_text("user data")
    dataset.mkdir()
    (dataset / PARTIAL_DIR).symlink_to(elsewhere)
    with pytest.raises(DataError, match="symbolic link"), staged_case(dataset, "c1"):
        pass
    assert (elsewhere / "c1" / "keep.txt").read_text() == "user data"


@pytest.mark.parametrize("name", ["../x", "/tmp/abs", "a/../../x"])
def test_paths_outside_the_dataset_are_refused(tmp_path, name):
    with pytest.raises(DataError, match="outside"):
        check_inside(tmp_path / "dataset" / name, tmp_path / "dataset")


@pytest.mark.parametrize("kind", ["user directory", "user file", "other zarr group"])
def test_only_an_iunet3d_case_is_ever_replaced_by_a_staged_case(tmp_path, kind):
    final = tmp_path / "c1"
    if kind == "user directory":
        final.mkdir()
        (final / "notes.txt").write_text("user data")
    elif kind == "user file":
        final.write_text("user data")
    else:
        zarr.open_group(final, mode="w", zarr_format=3, attributes={"someone": "else"})
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(DataError, match=f"{final}: exists and is not an iunet3d case"), staged_case(tmp_path, "c1"):
        pass
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing deleted, nothing staged


def test_a_user_directory_appearing_while_a_case_is_staged_is_not_replaced(tmp_path):
    with pytest.raises(DataError, match="is not an iunet3d case"), staged_case(tmp_path, "c1") as partial:
        _case(partial, {"name": "c1"})
        (tmp_path / "c1").mkdir()
        (tmp_path / "c1" / "notes.txt").write_text("user data")
    assert (tmp_path / "c1" / "notes.txt").read_text() == "user data"


def test_an_earlier_case_is_replaced_and_nothing_of_it_is_left(tmp_path):
    with staged_case(tmp_path, "c1") as partial:
        _case(partial, {"name": "c1", "try": 1})
    with staged_case(tmp_path, "c1") as partial:
        _case(partial, {"name": "c1", "try": 2})
    assert zarr.open_group(tmp_path / "c1", mode="r").attrs["iunet3d"]["try"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c1"]  # no staging or replaced directory left
