"""Checkpoint files are read with the weights-only unpickler: plain values load, code and objects are refused."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from iunet3d.infer.checkpoint_file import UnsafeCheckpointError, read_checkpoint
from tests.helpers.unsafe_pickle import WRITERS


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_a_file_that_holds_code_is_refused_without_running_it(tmp_path, kind):
    write = WRITERS[kind]
    proof = tmp_path / "proof"
    write(tmp_path / "proof.pt", proof)
    with open(tmp_path / "proof.pt", "rb") as file:
        if kind == "torch.save file":
            torch.load(file, weights_only=False)
        else:
            pickle.load(file)
    assert proof.is_dir()  # the crafted file does run code under a full unpickler

    marker = tmp_path / "marker"
    path = write(tmp_path / "step-9.pt", marker)
    with pytest.raises(UnsafeCheckpointError) as refused:
        read_checkpoint(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: refuses to unpickle code/objects") and "\n" not in message
    assert not marker.exists()


def test_checkpoints_that_hold_numpy_arrays_are_refused_with_what_they_need(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"model": {}, "step": 1, "rng": [{"numpy": np.random.get_state()}]}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"old\.pt: refuses to unpickle code/objects \(it needs numpy\."):
        read_checkpoint(path)


def test_tensors_and_plain_values_are_read_back(tmp_path):
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 3, "python": (3, (1, 2), None),
             "config": {"train": {"lr": 1e-3, "tags": ["a"]}}}  # fmt: skip
    torch.save(state, tmp_path / "plain.pt")
    loaded = read_checkpoint(tmp_path / "plain.pt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["python"] == (3, (1, 2), None) and loaded["config"] == state["config"] and loaded["step"] == 3


def test_missing_and_damaged_files_and_other_contents_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"absent\.pt: no such checkpoint$"):
        read_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pt: not a readable checkpoint") as unreadable:
        read_checkpoint(tmp_path / "junk.pt")
    assert not isinstance(unreadable.value, UnsafeCheckpointError)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt: not an iunet3d checkpoint \(holds a list, not a dict\)"):
        read_checkpoint(tmp_path / "list.pt")
