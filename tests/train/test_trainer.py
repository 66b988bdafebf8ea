"""The training loop in one process: checkpoints, exact resume, divergence, and clear errors."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest
import torch

from iunet3d.cli import main
from iunet3d.data import open_dataset
from iunet3d.distributed import Distributed
from iunet3d.infer.case_metrics import volume_confusion_counts
from iunet3d.infer.dice import dice_scores, mean_dice
from iunet3d.infer.trained_model import load_trained_model, predict_volume
from iunet3d.train.checkpoint import CheckpointManager, load_checkpoint
from iunet3d.train.toml_config import to_dict
from iunet3d.train.trainer import Trainer, TrainingError
from tests.helpers.train import DEMO_CONFIG, overrides, tiny_config, tiny_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("train") / "data")


def train(config, stop_after_first_step: bool = False) -> tuple[Trainer, dict]:
    trainer = Trainer(config, Distributed())
    trainer.preemption.requested = stop_after_first_step  # as if SIGTERM had arrived during the first step
    return trainer, trainer.fit()


def parameters(network) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in network.state_dict().items()}


def test_a_run_saves_complete_checkpoints_config_identity_and_summary(dataset, tmp_path):
    config = tiny_config(dataset, tmp_path / "run", "train.steps=4", "train.checkpoint_every=2", "validation.every=2")
    trainer, summary = train(config)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-2.pt", "step-4.pt"]
    state = torch.load(checkpoints / "step-4.pt", weights_only=True)  # tensors and plain values: no code to run
    for key in ("model", "step", "optimizer", "scheduler", "scaler", "data", "rng", "config", "wandb_id",
                "class_names", "normalization"):  # fmt: skip
        assert key in state, key
    assert state["step"] == 4
    assert all(not key.startswith("module.") for key in state["model"])  # the unwrapped network
    assert all(torch.equal(state["model"][k], v) for k, v in parameters(trainer.network).items())
    assert state["config"] == to_dict(config)
    assert state["data"]["position"] == 4 * config.data.batch_size
    identity = json.loads((tmp_path / "run" / "run.json").read_text())
    assert state["wandb_id"] == identity["wandb_id"]
    saved = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert saved["train"]["steps"] == 4 and saved["data"]["dataset"] == str(dataset)
    assert summary["completed"] and summary["step"] == 4
    assert set(summary) >= {"val/dice_mean", "val/dice/liver", "val/dice/kidney", "val/dice/lesion"}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 4
    assert 0 <= summary["val/dice/liver"] <= 1 and summary["patches_per_s"] > 0


def test_stopping_and_resuming_ends_bit_identical_to_an_uninterrupted_run(dataset, tmp_path):
    extra = ("train.steps=4", "train.checkpoint_every=3", "data.augment=true")
    straight, _ = train(tiny_config(dataset, tmp_path / "a", *extra))
    stopped, summary = train(tiny_config(dataset, tmp_path / "b", *extra), stop_after_first_step=True)
    assert summary["step"] == 1 and summary["stopped_by"] == "SIGTERM" and not summary["completed"]
    assert CheckpointManager(tmp_path / "b" / "checkpoints").steps() == [1]
    resumed, summary = train(tiny_config(dataset, tmp_path / "b", *extra))
    assert resumed.step == 4 and summary["completed"]
    expected, actual = parameters(straight.network), parameters(resumed.network)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert not all(torch.equal(parameters(stopped.network)[k], actual[k]) for k in expected)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(dataset, tmp_path):
    config = tiny_config(dataset, tmp_path / "run", "train.steps=20", "train.checkpoint_every=1", "train.lr=1e30",
                         "train.warmup_steps=0", "train.clip_grad_norm=0.0", "validation.every=0")  # fmt: skip
    with pytest.raises(TrainingError, match="train/loss is not finite at step") as raised:
        train(config)
    steps = CheckpointManager(tmp_path / "run" / "checkpoints").steps()
    assert steps and f"the last good checkpoint is step {steps[-1]}" in str(raised.value)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / f"step-{steps[-1]}.pt")
    assert all(torch.isfinite(value).all() for value in state["model"].values())


def run_cli(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(args)
    return exited.value.code, capsys.readouterr().err


def test_a_missing_dataset_is_a_one_line_error(tmp_path, capsys):
    args = ["train", "--config", str(DEMO_CONFIG)]
    for override in overrides(tmp_path / "absent", tmp_path / "run"):
        args += ["--set", override]
    code, error = run_cli(args, capsys)
    assert code == 2
    assert error.strip() == f"iunet3d: error: data.dataset: {tmp_path / 'absent'}: no such dataset directory"


def test_a_dataset_with_other_classes_than_the_config_expects_is_named(tmp_path, capsys):
    other = tiny_dataset(tmp_path / "two_classes", cases=2, shape=(8, 32, 32), class_names=("background", "organ"))
    args = ["train", "--config", str(DEMO_CONFIG)]
    for override in overrides(other, tmp_path / "run"):
        args += ["--set", override]
    code, error = run_cli(args, capsys)
    assert code == 2 and len(error.strip().splitlines()) == 1
    assert "has 2 classes ['background', 'organ'], but data.classes in the config expects 4" in error


def test_a_run_directory_from_another_dataset_is_refused_on_resume(dataset, tmp_path):
    train(tiny_config(dataset, tmp_path / "run", "train.steps=1", "validation.every=0"))
    saved = (tmp_path / "run" / "config.toml").read_bytes()
    other = tiny_dataset(tmp_path / "two_classes", cases=2, shape=(8, 32, 32), class_names=("background", "organ"))
    config = tiny_config(other, tmp_path / "run", "train.steps=2", "data.classes=['background', 'organ']",
                         "data.class_weights=[1.0]")  # fmt: skip
    with pytest.raises(TrainingError, match=r"checkpoint .*step-1.pt: the config differs") as refused:
        train(config)
    assert f"data.dataset: '{dataset}' -> '{other}'; " in str(refused.value)
    assert "data.classes: ['background', 'liver', 'kidney', 'lesion'] -> ['background', 'organ']" in str(refused.value)
    assert (tmp_path / "run" / "config.toml").read_bytes() == saved


def test_patch_validation_panels_are_the_middle_slices_of_the_validation_patches(dataset, tmp_path):
    config = tiny_config(dataset, tmp_path / "run", "train.steps=1", "wandb.image_panels=2", "validation.mode=patch")
    trainer, _ = train(config)
    panels = trainer.last_validation.panels
    assert [panel.key for panel in panels] == ["val/panel/0", "val/panel/1"]
    for index, panel in enumerate(panels):
        patch = trainer.validator.patches[index]
        middle = patch["label"].shape[0] // 2
        assert np.array_equal(panel.label, patch["label"][middle].numpy())
        assert np.array_equal(panel.image, patch["image"][0, middle].numpy())
        assert panel.prediction.shape == panel.label.shape and set(np.unique(panel.prediction)) <= {0, 1, 2, 3}
        assert panel.caption.startswith(patch["case"])


def test_whole_volume_validation_gives_the_dice_and_panels_of_predict_volume_on_the_held_out_cases(dataset, tmp_path):
    config = tiny_config(dataset, tmp_path / "run", "train.steps=2", "train.checkpoint_every=2",
                         "data.validation_cases=2", "wandb.image_panels=2")  # fmt: skip
    trainer, summary = train(config)
    held_out = trainer.validator.cases
    assert len(held_out) == 2 and trainer.validator.mine == held_out  # one rank: it predicts every case
    model = load_trained_model(tmp_path / "run" / "checkpoints" / "step-2.pt")
    counts, predictions = 0, {}
    for name in held_out:
        case = open_dataset(dataset).case(name)
        predictions[name] = predict_volume(model, case.image_array, overlap=0.5)
        counts = counts + volume_confusion_counts(predictions[name], case.label_array()[...], 4)
    expected = dice_scores(counts, model.class_names)
    result = trainer.last_validation
    assert result.dice == pytest.approx(expected, nan_ok=True)
    assert summary["val/dice_mean"] == pytest.approx(mean_dice(expected), nan_ok=True)
    assert result.panels == [] and [r.case for r in result.cases] == held_out  # one result per held-out case
    for name, case_result in zip(held_out, result.cases, strict=True):
        reference = np.asarray(open_dataset(dataset).case(name).label_array()[...])
        own = dice_scores(volume_confusion_counts(predictions[name], reference, 4), model.class_names)
        assert case_result.dice == pytest.approx(own, nan_ok=True)
        assert case_result.spacing == pytest.approx((2.5, 0.8, 0.8))
        voxel_ml = 2.5 * 0.8 * 0.8 / 1000
        for value, class_name in enumerate(model.class_names[1:], start=1):
            assert case_result.reference_ml[class_name] == pytest.approx((reference == value).sum() * voxel_ml)
            assert case_result.predicted_ml[class_name] == pytest.approx((predictions[name] == value).sum() * voxel_ml)
        z, y, x = (int(v) for v in case_result.panel.caption.split("at ")[1].split(" (")[0].replace("z=", "")
                   .replace("y=", "").replace("x=", "").split())  # fmt: skip
        if (predictions[name] != reference).any():
            assert predictions[name][z, y, x] != reference[z, y, x]  # the planes pass through an error
        axial = case_result.panel.label[: reference.shape[1], : reference.shape[2]]
        assert np.array_equal(axial, reference[z])  # the first tile is the axial plane at z
