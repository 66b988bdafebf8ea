"""A training checkpoint restored for whole-volume prediction (toward `iunet3d predict`)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import zarr

from iunet3d.cli import main
from iunet3d.data import open_dataset
from iunet3d.infer.checkpoint_file import read_checkpoint
from iunet3d.infer.trained_model import load_trained_model, predict_volume
from tests.helpers.train import train_tiny_checkpoint
from tests.helpers.unsafe_pickle import write_bare_pickle, write_code_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny_checkpoint(tmp_path_factory.mktemp("predict"))


def test_a_checkpoint_restores_the_trained_network_and_what_prediction_needs(trained):
    dataset, checkpoint, trainer = trained
    model = load_trained_model(checkpoint)
    assert model.step == 3 and model.class_names == open_dataset(dataset).class_names
    assert model.patch_size == (8, 32, 32) and model.in_channels == 1 and not model.network.training
    assert model.normalization == trainer.normalization
    for name, value in trainer.network.state_dict().items():
        assert torch.equal(model.network.state_dict()[name], value), name
    assert torch.load(checkpoint, weights_only=True)["step"] == 3  # tensors and plain values only: no code to run


def test_streamed_and_in_memory_prediction_give_the_same_labels_of_a_whole_case(trained, tmp_path):
    dataset, checkpoint, _ = trained
    model = load_trained_model(checkpoint)
    case = open_dataset(dataset).case("case_0")
    image = case.image_array  # read window by window from Zarr
    in_memory = predict_volume(model, image, overlap=0.5)
    out = zarr.create_array(str(tmp_path / "labels.zarr"), shape=image.shape, chunks=(8, 16, 16), dtype="uint8")
    streamed = predict_volume(model, image, overlap=0.5, stream=True, scratch=tmp_path, out=out)
    assert in_memory.shape == tuple(image.shape) and in_memory.dtype == np.uint8 and in_memory.max() < 4
    assert np.array_equal(np.asarray(streamed[...]), in_memory)
    assert list(tmp_path.glob("iunet3d-accumulator-*")) == []  # the temporary accumulator is removed


def test_inputs_that_do_not_fit_the_checkpoint_are_named(trained, tmp_path):
    _, checkpoint, _ = trained
    model = load_trained_model(checkpoint)
    with pytest.raises(ValueError, match=r"has classes \['background', 'organ'\], but checkpoint .* predicts"):
        model.check_input(["background", "organ"], what="dataset other")
    with pytest.raises(ValueError, match=r"has 2 image channel\(s\), but checkpoint .* was trained on 1"):
        model.check_input(channels=2)
    model.check_input(model.class_names)
    with pytest.raises(ValueError, match="nope.pt: no such checkpoint"):
        load_trained_model(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a readable checkpoint"):
        load_trained_model(tmp_path / "junk.pt")
    torch.save({"step": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not an iunet3d training checkpoint"):
        load_trained_model(tmp_path / "other.pt")


@pytest.mark.parametrize("kind", ["a real checkpoint with one more key", "a crafted pickle"])
def test_a_checkpoint_that_holds_code_is_refused_by_load_trained_model_and_predict(trained, tmp_path, capsys, kind):
    dataset, checkpoint, _ = trained
    marker, path = tmp_path / "marker", tmp_path / "step-3.pt"
    if kind == "a crafted pickle":
        write_bare_pickle(path, marker)
    else:
        write_code_checkpoint(path, marker, read_checkpoint(checkpoint))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: refuses to unpickle code/objects"):
        load_trained_model(path)
    with pytest.raises(SystemExit) as exited:
        main(["predict", "--no-progress", "--checkpoint", str(path), "--input", str(dataset), "--out",
              str(tmp_path / "out")])  # fmt: skip
    error = capsys.readouterr().err
    assert exited.value.code == 2 and len(error.strip().splitlines()) == 1, error
    assert error.startswith(f"iunet3d: error: {path}: refuses to unpickle code/objects")
    assert not marker.exists()
