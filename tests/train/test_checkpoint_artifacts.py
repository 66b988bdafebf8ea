"""Checkpoints as W&B model artifacts, the best validation in the run summary, and the run's dataset and network in
its config: the policy alone, then a real offline run read back from the files wandb writes (no server, no mocks)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

from iunet3d.distributed import Distributed
from iunet3d.tracking.wandb_run import WandbConfig, WandbLogger
from iunet3d.train.checkpoint import load_checkpoint
from iunet3d.train.checkpoint_artifacts import (
    artifact_name,
    artifact_reference,
    checkpoint_aliases,
    checkpoint_metadata,
)
from iunet3d.train.toml_config import to_dict
from iunet3d.train.trainer import Trainer
from tests.helpers.train import tiny_config, tiny_dataset
from tests.helpers.wandb_records import (
    read_offline_artifacts,
    read_offline_config,
    read_offline_history,
    read_offline_summary,
)


@pytest.mark.parametrize(
    ("policy", "is_final", "is_new_best", "expected"),
    [("best", False, False, None), ("best", False, True, ["step-7", "best"]), ("best", True, False, ["step-7", "last"]),
     ("best", True, True, ["step-7", "best", "last"]),
     ("last", False, False, None), ("last", False, True, None), ("last", True, False, ["step-7", "last"]),
     ("last", True, True, ["step-7", "best", "last"]),
     ("all", False, False, ["step-7"]), ("all", False, True, ["step-7", "best"]),
     ("all", True, False, ["step-7", "last"]),
     ("none", False, True, None), ("none", True, True, None)],
)  # fmt: skip
def test_the_policy_picks_the_checkpoints_and_their_aliases(policy, is_final, is_new_best, expected):
    assert checkpoint_aliases(policy, 7, is_final, is_new_best) == expected


def test_an_unknown_policy_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match="^wandb.log_checkpoints: "):
        checkpoint_aliases("sometimes", 1, True, True)


def test_one_artifact_name_per_run_and_a_reference_per_step():
    assert artifact_name("ab12cd34") == "model-ab12cd34"
    assert artifact_reference("ab12cd34", 40) == "model-ab12cd34:step-40"


def test_metadata_holds_what_prediction_needs_and_the_step_metrics_as_json():
    state = {"step": 5, "model": {"weight": torch.zeros(2)}, "optimizer": {}, "config": {"train": {"steps": 9}},
             "class_names": ["background", "liver"], "normalization": {"mean": 1.0, "std": 2.0},
             "network": {"channels": 8, "resampling_stride": ((1, 2, 2), (2, 2, 2)), "norm": None},
             "patch_size": [8, 32, 32], "target_spacing": None, "git_revision": "abc"}  # fmt: skip
    metadata = checkpoint_metadata(state, {"val/dice_mean": 0.5, "val/dice/liver": 0.5, "val/dice/lesion": math.nan})
    assert metadata == {
        "step": 5, "config": {"train": {"steps": 9}}, "class_names": ["background", "liver"],
        "normalization": {"mean": 1.0, "std": 2.0},
        "network": {"channels": 8, "resampling_stride": [[1, 2, 2], [2, 2, 2]], "norm": None},
        "patch_size": [8, 32, 32], "target_spacing": None, "git_revision": "abc",
        "val/dice_mean": 0.5, "val/dice/liver": 0.5, "val/dice/lesion": None,
    }  # fmt: skip
    assert "val/dice_mean" not in checkpoint_metadata(state)  # a step without validation has no metrics


def md5_base64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def without_latest(aliases: list[str]) -> set[str]:
    return set(aliases) - {"latest"}  # W&B's own alias of the newest version


@pytest.mark.slow
def test_a_run_logs_its_checkpoints_as_artifacts_and_its_best_validation_dataset_and_network(wandb_env, tmp_path):
    dataset = tiny_dataset(tmp_path / "data")
    run_dir = tmp_path / "run"
    # Validation at steps 2 and 4; a checkpoint every step, the newest 2 kept: step 1 and 2 are rotated away
    # before the run ends, so their artifacts must hold copies.
    config = tiny_config(dataset, run_dir, "train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=2",
                         "validation.every=2", "wandb.mode=offline", "wandb.project=iunet3d-tests",
                         "wandb.log_checkpoints=all")  # fmt: skip
    trainer = Trainer(config, Distributed())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = trainer.fit()
    assert not [str(w.message) for w in caught if str(w.message).startswith("W&B")]
    sys.modules["wandb"].teardown()
    run_id = trainer.identity["wandb_id"]
    assert trainer.logger.run_id == run_id

    # The best validation: the first of the highest val/dice_mean the trainer logged.
    validations = {row["_step"]: row["val/dice_mean"] for row in read_offline_history(run_dir, run_id)
                   if "val/dice_mean" in row}  # fmt: skip
    assert sorted(validations) == [2, 4]
    best_step = 4 if validations[4] > validations[2] else 2
    assert trainer.best_validation == (pytest.approx(validations[best_step]), best_step)
    assert read_offline_summary(run_dir, run_id)["val/best_dice_mean"] == pytest.approx(validations[best_step])
    assert read_offline_summary(run_dir, run_id)["val/best_step"] == best_step
    assert (summary["val/best_dice_mean"], summary["val/best_step"]) == trainer.best_validation

    # One artifact, a version per checkpoint, "best" on each that set a new best validation when it was saved (the
    # first validation always does; W&B moves the alias to the newest version), "last" on the final one.
    logged = read_offline_artifacts(run_dir, run_id)
    artifacts = [a for a in logged if a.type == "model"]
    assert {a.name for a in artifacts} == {f"model-{run_id}"}
    assert len([a for a in logged if a.type == "run_table"]) == 4  # the case and class tables of two validations
    expected = {step: {f"step-{step}"} for step in (1, 2, 3, 4)}
    expected[2].add("best")
    expected[best_step].add("best")
    expected[4].add("last")
    assert {a.metadata["step"]: without_latest(a.aliases) for a in artifacts} == expected
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*.pt")) == ["step-3.pt", "step-4.pt"]
    by_step = {a.metadata["step"]: a for a in artifacts}
    for step, artifact in by_step.items():
        (entry,) = artifact.entries.values()
        assert list(artifact.entries) == [f"step-{step}.pt"]
        local = Path(entry["local_path"])  # a copy in W&B's staging area: rotated-away checkpoints stay uploadable
        assert local.is_file() and local.is_relative_to(wandb_env / "wandb-data")
        content = local.read_bytes()
        assert (entry["size"], entry["digest"]) == (len(content), md5_base64(content))
        state = torch.load(io.BytesIO(content), weights_only=True)
        assert state["step"] == step and state["wandb_artifact"] == f"model-{run_id}:step-{step}"
        if step >= 3:
            assert (checkpoints / f"step-{step}.pt").read_bytes() == content
        metadata = artifact.metadata
        assert metadata["class_names"] == ["background", "liver", "kidney", "lesion"]
        assert metadata["normalization"] == trainer.normalization.to_dict()
        assert metadata["config"] == to_dict(config)
        assert metadata["network"] == json.loads(json.dumps(state["network"]))  # tuples as lists
        assert metadata["network"]["resampling_stride"] == [[1, 2, 2], [2, 2, 2]]
        assert metadata["patch_size"] == [8, 32, 32] and metadata["git_revision"] == trainer.identity["git_revision"]
        assert metadata["target_spacing"] == state["target_spacing"]
        if step in validations:
            assert metadata["val/dice_mean"] == pytest.approx(validations[step])
            assert set(metadata) >= {"val/dice/liver", "val/dice/kidney", "val/dice/lesion"}
        else:
            assert not any(key.startswith("val/") for key in metadata)
    final = load_checkpoint(checkpoints / "step-4.pt")
    assert final["best_validation"] == [pytest.approx(validations[best_step]), best_step]

    # The dataset's fingerprint and the network's resolved layout in the run config.
    run_config = read_offline_config(run_dir, run_id)
    assert run_config["dataset"] == {
        "path": str(dataset), "cases": 4, "training_cases": 3, "validation_cases": 1,
        "class_names": ["background", "liver", "kidney", "lesion"],
        "spacing": {"median": [2.5, 0.8, 0.8], "min": [2.5, 0.8, 0.8], "max": [2.5, 0.8, 0.8]},
        "target_spacing": "native" if trainer.target_spacing is None else list(trainer.target_spacing),
    }  # fmt: skip
    network = run_config["network"]
    assert network["architecture"] == [1, 1, 1] and network["resampling_strides"] == [[1, 2, 2], [2, 2, 2]]
    assert network["block_depth"] == 1 and network["levels"] == 3
    assert network["channels"] == list(trainer.network.iunet.channels) == [8, 16, 32]
    assert network["downsampling_factors"] == [2, 4, 4]
    assert network["parameters"] == sum(p.numel() for p in trainer.network.parameters()) > 0

    # The best survives a resume (here: at the last step, W&B off).
    resumed = Trainer(tiny_config(dataset, run_dir, "train.steps=4", "train.keep_checkpoints=2"), Distributed())
    assert resumed.step == 4 and resumed.best_validation == trainer.best_validation


@pytest.mark.slow  # starts wandb (about 3 s alone)
def test_a_wandb_failure_while_logging_a_checkpoint_warns_once_and_training_goes_on(wandb_env, tmp_path):
    logger = WandbLogger(WandbConfig(mode="offline", project="iunet3d-tests"), tmp_path, {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger.log_checkpoint(tmp_path / "absent.pt", "model-x", ["step-1", "best"], {"step": 1})
        logger.update_summary({"val/best_dice_mean": 0.5})
        logger.log_checkpoint(tmp_path / "absent.pt", "model-x", ["step-2"], {"step": 2})
        logger.close()
    messages = [str(w.message) for w in caught if str(w.message).startswith("W&B")]
    assert len(messages) == 1 and "could not log checkpoint" in messages[0] and "absent.pt" in messages[0], messages
    assert messages[0].endswith("training goes on without W&B logging")
    assert not logger.active
