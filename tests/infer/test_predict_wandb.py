"""`iunet3d predict --wandb`: the prediction job as an offline W&B run, read back from its files."""

from __future__ import annotations

import csv
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from iunet3d.cli import main
from iunet3d.distributed import Distributed
from iunet3d.infer.checkpoint_file import read_checkpoint
from iunet3d.train.trainer import Trainer
from tests.helpers.cli import run_cli
from tests.helpers.train import tiny_config, tiny_dataset, train_tiny_checkpoint
from tests.helpers.wandb_records import (
    read_logged_table,
    read_offline_config,
    read_offline_history,
    read_offline_run_ids,
    read_offline_runs,
    read_offline_summary,
)


@pytest.mark.slow
def test_a_prediction_job_logs_its_case_table_panels_and_the_checkpoint_it_used(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # W&B's staging area, kept per test
    dataset = tiny_dataset(tmp_path / "data", cases=3, shape=(12, 40, 44))
    config = tiny_config(dataset, tmp_path / "run", "train.steps=2", "train.checkpoint_every=2", "validation.every=0",
                         "data.validation_cases=0", "wandb.mode=offline", "wandb.log_checkpoints=last")  # fmt: skip
    Trainer(config, Distributed()).fit()
    checkpoint = tmp_path / "run" / "checkpoints" / "step-2.pt"
    state = read_checkpoint(checkpoint)
    assert state["wandb_artifact"] == f"model-{state['wandb_id']}:step-2"
    out, logs = tmp_path / "out", tmp_path / "logs"
    argv = ["predict", "--no-progress", "--checkpoint", str(checkpoint), "--input", str(dataset), "--out", str(out),
            "--wandb", "--wandb-mode", "offline", "--wandb-dir", str(logs)]  # fmt: skip
    assert main(argv) == 0
    sys.modules["wandb"].teardown()

    (run_id,) = read_offline_run_ids(logs)
    assert run_id != state["wandb_id"] and not (tmp_path / "run" / "wandb" / run_id).exists()
    (run,) = read_offline_runs(logs)
    assert run.complete and run.job_type == "predict"
    used = read_offline_config(logs)["checkpoint"]  # offline: W&B refuses use_artifact, the reference is kept
    assert used["artifact"] == state["wandb_artifact"] and used["training_run"] == state["wandb_id"]
    assert used["step"] == 2 and used["path"] == str(checkpoint.resolve())

    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    (logged,) = [row for row in read_offline_history(logs) if "predict/cases" in row]
    table = read_logged_table(logs, logged["predict/cases"])
    columns = table["columns"]
    assert columns[:3] == ["case", "spacing_mm", "dice_mean"] and columns[-1] == "image"
    assert [line[0] for line in table["data"]] == ["case_0", "case_1", "case_2"]
    for row in rows:  # the table's Dice and volumes are the ones in metrics.csv
        line = next(line for line in table["data"] if line[0] == row["case"])
        for column in ("dice", "predicted_ml", "reference_ml"):
            value = line[columns.index(f"{column}/{row['class']}")]
            assert (value is None and row[column] == "nan") or value == pytest.approx(float(row[column]), abs=1e-9)
    images = [line[-1] for line in table["data"] if line[-1] is not None]
    assert len(images) == 3  # every case is among the 8 worst
    for image in images:
        assert image["_type"] == "image-file" and set(image["masks"]) == {"ground_truth", "prediction"}
        pixels = np.asarray(Image.open(table["files"][image["path"]]))
        assert pixels.ndim == 2 and pixels.shape[1] > 44  # three planes side by side
    classes = read_logged_table(logs, logged["predict/classes"])
    assert [line[0] for line in classes["data"]] == ["liver", "kidney", "lesion"]
    summary = read_offline_summary(logs)
    assert summary["predict/scored_cases"] == 3
    dice = [float(row["dice"]) for row in rows if row["dice"] != "nan"]
    assert summary["predict/dice_mean"] == pytest.approx(
        np.mean([np.mean([float(r["dice"]) for r in rows if r["case"] == c and r["dice"] != "nan"])
                 for c in ("case_0", "case_1", "case_2")])) and dice  # fmt: skip


@pytest.mark.slow
def test_a_wandb_failure_never_stops_a_prediction(tmp_path):
    dataset, checkpoint, _ = train_tiny_checkpoint(tmp_path)  # trained without W&B: no artifact to link
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where W&B would write")
    argv = ["predict", "--no-progress", "--checkpoint", str(checkpoint), "--input", str(dataset), "--out",
            str(tmp_path / "out"), "--wandb", "--wandb-mode", "offline", "--wandb-dir", str(blocked)]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    messages = [str(w.message) for w in caught if str(w.message).startswith("W&B:")]
    assert len(messages) == 1 and "could not start a run" in messages[0]
    assert len(list(csv.DictReader((tmp_path / "out" / "metrics.csv").read_text().splitlines()))) == 9
    assert blocked.read_text() == "a file where W&B would write"


def test_a_bad_wandb_project_is_refused_before_any_work(tmp_path, capsys):
    argv = ["predict", "--checkpoint", str(tmp_path / "absent.pt"), "--input", str(tmp_path), "--out",
            str(tmp_path / "out"), "--wandb", "--wandb-project", "team/project"]  # fmt: skip
    code, error = run_cli(argv, capsys)
    assert code == 2 and "\n" not in error and error.startswith("iunet3d: error: --wandb-project: ")
    assert not (tmp_path / "out").exists()
