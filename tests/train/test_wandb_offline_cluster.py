"""Training on nodes without internet: offline W&B files in a directory of one's choice, synced later with the
command the run prints (checked with ``wandb sync --dry-run``, which lists what it would upload)."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from iunet3d.distributed import Distributed
from iunet3d.train.trainer import Trainer
from tests.helpers.train import tiny_config, tiny_dataset
from tests.helpers.wandb_records import read_offline_history


@pytest.mark.slow
def test_offline_runs_in_a_shared_wandb_dir_sync_with_the_command_the_run_prints(tmp_path):
    dataset = tiny_dataset(tmp_path / "data", cases=2, shape=(8, 32, 32))
    shared = tmp_path / "login-node-visible"
    summaries = []
    for name in ("first", "second"):  # two runs writing into one wandb.dir
        config = tiny_config(dataset, tmp_path / name, "train.steps=2", "data.validation_cases=0",
                             "wandb.mode=offline", f"wandb.dir={shared}")  # fmt: skip
        summaries.append(Trainer(config, Distributed()).fit())
    sys.modules["wandb"].teardown()
    for name, summary in zip(("first", "second"), summaries, strict=True):
        assert not (tmp_path / name / "wandb").exists()  # nothing of W&B in the run directory
        assert summary["wandb_dir"] == str(shared / "wandb")
        assert [row["_step"] for row in read_offline_history(shared, summary["wandb_id"]) if "train/loss" in row] == [
            1,
            2,
        ]
        command = shlex.split(summary["wandb_sync"])
        assert command[:2] == ["wandb", "sync"]
        wandb_cli = str(Path(sys.executable).with_name("wandb"))
        listed = subprocess.run(f"{shlex.quote(wandb_cli)} sync --dry-run {summary['wandb_sync'].split(' ', 2)[2]}",
                                shell=True, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        files = [line.split()[-1] for line in (listed.stdout + listed.stderr).splitlines() if line.endswith(".wandb")]
        assert len(files) == 1 and files[0].endswith(f"run-{summary['wandb_id']}.wandb")  # this run only
