"""Resuming a run directory: only the keys that may change between restarts may change, and checkpoints are
read without running code."""

from __future__ import annotations

import shutil
import tomllib

import pytest

from iunet3d.cli import main
from iunet3d.distributed import Distributed
from iunet3d.infer.checkpoint_file import read_checkpoint
from iunet3d.train.checkpoint import CheckpointManager
from iunet3d.train.config import RESUME_MAY_CHANGE, may_change_on_resume
from iunet3d.train.schedule import lr_factor
from iunet3d.train.trainer import Trainer, TrainingError
from tests.helpers.train import DEMO_CONFIG, overrides, tiny_config, tiny_dataset
from tests.helpers.unsafe_pickle import write_bare_pickle, write_code_checkpoint

#: The run every test resumes: 3 steps, a checkpoint after each, no held-out cases (no validation to wait for).
RUN = ("train.steps=3", "train.checkpoint_every=1", "data.validation_cases=0")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("resume") / "data", cases=3, shape=(12, 40, 44))


@pytest.fixture(scope="module")
def saved_run(dataset, tmp_path_factory):
    """A run directory as a run of ``RUN`` leaves it (checkpoints of steps 1 to 3), written without training."""
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    trainer = Trainer(tiny_config(dataset, run_dir, *RUN), Distributed())
    for step in (1, 2, 3):
        trainer.step = step
        trainer.save_checkpoint()
    trainer.loader.close()
    return run_dir


@pytest.fixture
def run_copy(dataset, saved_run, tmp_path):
    """(dataset, a fresh copy of the saved run directory): each test may change it."""
    return dataset, shutil.copytree(saved_run, tmp_path / "run")


def files(directory) -> dict:
    return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def train_cli(dataset, run_dir, capsys, *extra: str) -> tuple[int, str]:
    args = ["train", "--config", str(DEMO_CONFIG)]
    for override in overrides(dataset, run_dir, *RUN, *extra):
        args += ["--set", override]
    with pytest.raises(SystemExit) as exited:
        main(args)
    return exited.value.code, capsys.readouterr().err


def test_a_resume_that_changes_the_learning_rate_is_refused_and_leaves_the_run_directory_as_it_was(run_copy, capsys):
    dataset, run_dir = run_copy
    before = files(run_dir)
    code, error = train_cli(dataset, run_dir, capsys, "train.lr=0.5", "model.channels=16", "train.steps=5")
    assert code == 2 and len(error.strip().splitlines()) == 1, error
    assert f"checkpoint {run_dir / 'checkpoints' / 'step-3.pt'}: the config differs" in error
    assert "keys that may not change on resume: model.channels: 8 -> 16; train.lr: 0.002 -> 0.5. " in error
    assert "train.steps: 3" not in error  # a key that may change is not a difference
    assert files(run_dir) == before  # config.toml byte-identical, no checkpoint, no summary written


@pytest.mark.slow
def test_a_resume_with_a_changed_step_count_goes_on_to_it_with_the_schedule_of_the_new_count(dataset, tmp_path):
    run_dir = tmp_path / "run"
    Trainer(tiny_config(dataset, run_dir, *RUN), Distributed()).fit()
    config = tiny_config(dataset, run_dir, *RUN, "train.steps=6", "train.checkpoint_every=3")
    trainer = Trainer(config, Distributed())
    assert trainer.step == 3
    schedule = {"warmup_steps": 2, "schedule": "cosine", "min_lr_ratio": config.train.min_lr_ratio}
    assert lr_factor(3, steps=6, **schedule) != lr_factor(3, steps=3, **schedule)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(config.train.lr * lr_factor(3, steps=6, **schedule))
    summary = trainer.fit()
    assert summary["step"] == 6 and summary["completed"]
    assert CheckpointManager(run_dir / "checkpoints").steps()[-1] == 6
    assert read_checkpoint(run_dir / "checkpoints" / "step-6.pt")["config"]["train"]["steps"] == 6
    assert tomllib.loads((run_dir / "config.toml").read_text())["train"]["steps"] == 6


def test_checkpoint_files_of_which_none_is_readable_stop_the_run_naming_them(run_copy):
    dataset, run_dir = run_copy
    checkpoints = run_dir / "checkpoints"
    for path in checkpoints.glob("step-*.pt"):
        path.write_bytes(path.read_bytes()[:200])  # truncated: the zip's directory is gone
    before = files(run_dir)
    expected = rf"^{checkpoints}: no checkpoint is readable: step-3.pt \(not a readable .*; step-2.pt .*; step-1.pt "
    with pytest.warns(UserWarning, match="unreadable checkpoint skipped"), pytest.raises(TrainingError, match=expected):
        Trainer(tiny_config(dataset, run_dir, *RUN), Distributed())
    assert files(run_dir) == before


@pytest.mark.parametrize("kind", ["a real checkpoint with one more key", "a crafted pickle"])
def test_a_checkpoint_that_holds_code_stops_the_resume_without_running_it(run_copy, capsys, kind):
    dataset, run_dir = run_copy
    marker, path = run_dir.parent / "marker", run_dir / "checkpoints" / "step-7.pt"
    if kind == "a crafted pickle":
        write_bare_pickle(path, marker)
    else:
        write_code_checkpoint(path, marker, read_checkpoint(run_dir / "checkpoints" / "step-3.pt"))
    before = files(run_dir)
    code, error = train_cli(dataset, run_dir, capsys, "train.steps=8")
    assert code == 2 and len(error.strip().splitlines()) == 1, error
    assert error.startswith(f"iunet3d: error: {path}: refuses to unpickle code/objects")
    assert not marker.exists()
    assert files(run_dir) == before


def test_the_keys_that_may_change_on_resume_exist_and_define_neither_model_nor_optimisation():
    config = tiny_config("unused-dataset", "unused-run")  # the config alone: nothing is read
    for key in RESUME_MAY_CHANGE:
        section, name = key.split(".")
        assert name == "*" or hasattr(getattr(config, section), name), key
    for key in ("train.lr", "train.seed", "train.schedule", "data.dataset", "data.batch_size", "model.channels"):
        assert not may_change_on_resume(key), key
    assert may_change_on_resume("wandb.project") and may_change_on_resume("train.steps")
