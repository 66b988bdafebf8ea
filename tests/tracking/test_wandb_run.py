"""The W&B logger against real offline runs, read back from the files wandb writes (no server, no mocks)."""

from __future__ import annotations

import contextlib
import glob
import json
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from iunet3d.distributed import Distributed
from iunet3d.tracking.wandb_run import (
    NullLogger,
    SegmentationPanel,
    WandbConfig,
    WandbLogger,
    create_logger,
    resolve_mode,
)
from iunet3d.train.trainer import Trainer
from tests.helpers.train import tiny_config, tiny_dataset
from tests.helpers.wandb_records import (
    read_offline_config,
    read_offline_history,
    read_offline_run_ids,
    read_offline_runs,
)

OFFLINE = WandbConfig(mode="offline", project="iunet3d-tests")

# Runs a logger in a fresh process (the .wandb file is complete only once its writer exits) and prints the run id.
DRIVER = """
import json, sys, warnings
from pathlib import Path
from iunet3d.tracking.wandb_run import WandbConfig, create_logger, sync_command
spec = json.loads(sys.argv[1])
logger = create_logger(WandbConfig(**spec["config"]), Path(spec["run_dir"]), spec["run_config"],
                       run_id=spec["run_id"], resume_step=spec["resume_step"])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for metrics, step in spec["logs"]:
        logger.log(metrics, step)
    logger.close()
print(json.dumps({"run_id": logger.run_id, "sync": sync_command(Path(spec["run_dir"])),
                  "warnings": [str(w.message) for w in caught if str(w.message).startswith("W&B")]}))
"""


pytestmark = pytest.mark.usefixtures("wandb_env")  # every test: no W&B environment of the caller


def run_logger_process(run_dir, logs, run_id=None, resume_step=0, run_config=None) -> dict:
    spec = {"config": {"mode": "offline", "project": "iunet3d-tests"}, "run_dir": str(run_dir), "logs": logs,
            "run_config": run_config or {}, "run_id": run_id, "resume_step": resume_step}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(spec)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def steps_of(history: list[dict], key: str) -> list[int]:
    return [row["_step"] for row in history if key in row]


def captured_wandb_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("W&B")]


@pytest.mark.slow
def test_offline_run_logs_metrics_at_their_steps_with_the_run_config(tmp_path):
    run_config = {"train": {"lr": 0.001, "steps": 20}, "model": {"architecture": [2, 2]}}
    logs = [[{"train/loss": 1.0}, 0], [{"train/loss": 0.5}, 10], [{"train/loss": 0.25}, 20],
            [{"val/dice/liver": 0.75, "val/dice/mean": 0.7}, 20]]  # fmt: skip
    out = run_logger_process(tmp_path / "run", logs, run_config=run_config)
    assert out["warnings"] == []
    assert read_offline_run_ids(tmp_path / "run") == [out["run_id"]]
    (run,) = read_offline_runs(tmp_path / "run")
    assert run.complete and run.run_id == out["run_id"]
    history = read_offline_history(tmp_path / "run")
    assert [row["_step"] for row in history] == [0, 10, 20]
    assert [row["train/loss"] for row in history] == [1.0, 0.5, 0.25]
    assert steps_of(history, "val/dice/liver") == [20]  # same step as train/loss: one row
    assert history[-1]["val/dice/liver"] == 0.75 and history[-1]["val/dice/mean"] == 0.7
    assert read_offline_config(tmp_path / "run") == run_config
    command = shlex.split(out["sync"])
    assert command[:2] == ["wandb", "sync"] and glob.glob(command[2]) == [str(run.path.parent)]


@pytest.mark.slow
def test_resume_with_the_stored_id_continues_the_run_and_drops_steps_before_resume_step(tmp_path):
    first = run_logger_process(tmp_path, [[{"train/loss": 1.0 / (s + 1)}, s] for s in range(5)])
    # Checkpoint at step 3: the resumed process logs from step 3 on; a stale step 2 is dropped (one warning).
    second = run_logger_process(tmp_path, [[{"train/loss": 0.1}, 2], [{"train/loss": 0.2}, 1],
                                           [{"train/loss": 0.3}, 3], [{"train/loss": 0.4}, 6]],
                                run_id=first["run_id"], resume_step=3)  # fmt: skip
    assert second["run_id"] == first["run_id"]
    assert len(second["warnings"]) == 1 and "dropped step 2" in second["warnings"][0]
    assert read_offline_run_ids(tmp_path) == [first["run_id"]]
    runs = read_offline_runs(tmp_path, first["run_id"])
    assert len(runs) == 2 and all(run.complete for run in runs)
    assert [row["_step"] for row in runs[0].history] == [0, 1, 2, 3, 4]
    assert [(row["_step"], row["train/loss"]) for row in runs[1].history] == [(3, 0.3), (6, 0.4)]
    assert steps_of(read_offline_history(tmp_path), "train/loss") == [0, 1, 2, 3, 4, 3, 6]


@pytest.mark.slow
def test_a_step_lower_than_the_last_is_dropped_with_one_warning(tmp_path):
    logger = WandbLogger(OFFLINE, tmp_path, {"seed": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (5, 3, 2, 5, 6):
            logger.log({"train/loss": float(step)}, step)
        logger.close()
    messages = captured_wandb_warnings(caught)
    assert len(messages) == 1 and "dropped step 3" in messages[0] and "step 5" in messages[0]
    sys.modules["wandb"].teardown()
    history = read_offline_history(tmp_path, logger.run_id)
    assert [(row["_step"], row["train/loss"]) for row in history] == [(5, 5.0), (6, 6.0)]


def test_segmentation_panels_are_logged_as_images_with_ground_truth_and_prediction_masks(tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.normal(-300.0, 400.0, size=(5, 24, 32))  # HU-like, far outside 0..255
    label = np.stack([np.full((24, 32), z % 3) for z in range(5)])  # slice z holds class z % 3
    label[2, :4, :4] = 1
    prediction = rng.integers(0, 3, size=(5, 24, 32))
    names = ["background", "liver", "tumour"]
    panel = SegmentationPanel.middle_slice("val/panel/case_003", volume, label, prediction, names, "case_003 z=2")
    logger = WandbLogger(OFFLINE, tmp_path, {})
    logger.log({"val/dice/liver": 0.5}, 7)
    logger.log_images([panel], 7)
    logger.close()
    sys.modules["wandb"].teardown()

    (row,) = [row for row in read_offline_history(tmp_path) if "val/panel/case_003" in row]
    image = row["val/panel/case_003"]
    assert row["_step"] == 7 and row["val/dice/liver"] == 0.5
    assert image["_type"] == "image-file" and (image["width"], image["height"]) == (32, 24)
    assert image["caption"] == "case_003 z=2"
    assert set(image["masks"]) == {"ground_truth", "prediction"}
    files = next((tmp_path / "wandb").glob("offline-run-*")) / "files"
    pixels = np.asarray(Image.open(files / image["path"]))
    assert pixels.dtype == np.uint8 and pixels.min() == 0 and pixels.max() == 255  # scaled to the full range
    assert np.corrcoef(pixels.ravel().astype(float), volume[2].ravel())[0, 1] > 0.99  # the middle slice
    for name, expected in (("ground_truth", label[2]), ("prediction", prediction[2])):
        mask = image["masks"][name]
        assert mask["_type"] == "mask"
        np.testing.assert_array_equal(np.asarray(Image.open(files / mask["path"])), expected)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"mode": "sometimes"}, "wandb.mode"), ({"project": "a/b"}, "wandb.project"), ({"project": ""}, "wandb.project"),
     ({"tags": ("ok", "")}, "wandb.tags[1]"), ({"image_panels": -1}, "wandb.image_panels"),
     ({"init_timeout": 0.0}, "wandb.init_timeout")],
)  # fmt: skip
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{re.escape(field)}: "):
        WandbConfig(**kwargs)


def test_panel_shapes_must_agree():
    with pytest.raises(ValueError, match="case_1"):
        SegmentationPanel("case_1", np.zeros((4, 4)), np.zeros((4, 4), int), np.zeros((4, 5), int), ["bg"])


def test_auto_mode_is_offline_without_credentials_and_follows_wandb_mode_and_credentials(monkeypatch, tmp_path):
    auto = WandbConfig()
    assert resolve_mode(auto) == "offline"
    netrc = tmp_path / "home" / ".netrc"
    netrc.write_text("machine example.org login user password secret\n")
    netrc.chmod(0o600)
    assert resolve_mode(auto) == "offline"  # credentials for another host
    netrc.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    assert resolve_mode(auto) == "online"
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert resolve_mode(auto) == "online"
    for env_mode, expected in (("disabled", "disabled"), ("offline", "offline"), ("dryrun", "offline")):
        monkeypatch.setenv("WANDB_MODE", env_mode)
        assert resolve_mode(auto) == expected  # WANDB_MODE wins over credentials
    assert resolve_mode(WandbConfig(mode="online")) == "online"  # an explicit mode wins over WANDB_MODE
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="^WANDB_MODE: .*'sometimes'"):
        resolve_mode(auto)


@pytest.mark.parametrize(
    ("config", "run_id"),
    [(WandbConfig(mode="online", project="iunet3d-tests"), None),  # no API key: wandb raises at once
     (OFFLINE, "bad/id")],  # e.g. a damaged checkpoint: W&B rejects "/" in run ids
)  # fmt: skip
def test_a_run_that_cannot_start_warns_once_and_then_logs_nothing(tmp_path, config, run_id):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = create_logger(config, tmp_path, {}, run_id=run_id)
        logger.log({"train/loss": 1.0}, 1)
        logger.log_images(
            [SegmentationPanel("p", np.zeros((2, 2)), np.zeros((2, 2), int), np.zeros((2, 2), int), ["bg"])], 1
        )
        logger.close()
        logger.close()
    messages = captured_wandb_warnings(caught)
    assert len(messages) == 1 and messages[0].endswith("training goes on without W&B logging"), messages
    assert "could not start a run" in messages[0]
    assert logger.run_id is None
    assert not list(tmp_path.glob("wandb/*run-*"))


def test_a_wandb_failure_while_logging_warns_once_and_training_goes_on(tmp_path):
    logger = WandbLogger(OFFLINE, tmp_path, {})
    logger.log({"train/loss": 1.0}, 0)
    sys.modules["wandb"].teardown()  # wandb's service goes away under the run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger.log({"train/loss": 0.5}, 1)
        logger.log({"train/loss": 0.25}, 2)
        logger.close()
    messages = captured_wandb_warnings(caught)
    assert len(messages) == 1 and "could not log metrics" in messages[0], messages
    assert logger.run_id is not None


def test_other_ranks_and_disabled_mode_get_a_null_logger_without_importing_wandb(tmp_path):
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from iunet3d.tracking.wandb_run import WandbConfig, create_logger\n"
        f"a = create_logger(WandbConfig(mode='offline'), Path({str(tmp_path)!r}), {{}}, rank=1)\n"
        f"b = create_logger(WandbConfig(mode='disabled'), Path({str(tmp_path)!r}), {{}}, rank=0)\n"
        "for logger in (a, b):\n"
        "    logger.log({'train/loss': 1.0}, 1); logger.close()\n"
        "print(type(a).__name__, type(b).__name__, a.run_id, b.run_id, 'wandb' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["NullLogger", "NullLogger", "None", "None", "False"]
    assert list(tmp_path.iterdir()) == [tmp_path / "home"]  # nothing written
    assert isinstance(create_logger(OFFLINE, tmp_path, {}, rank=3), NullLogger)


@pytest.fixture
def silent_server():
    """A local HTTP address whose server accepts connections and never answers: (its URL, the connections)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    connections, stop = [], threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                connections.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", connections
    stop.set()
    thread.join()
    for connection in connections:
        connection.close()
    server.close()


@pytest.mark.slow
def test_a_wandb_server_that_never_answers_delays_training_by_at_most_init_timeout(tmp_path, monkeypatch,
                                                                                   silent_server):  # fmt: skip
    url, connections = silent_server
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("WANDB_BASE_URL", url)
    dataset = tiny_dataset(tmp_path / "data", cases=2, shape=(8, 32, 32))
    config = tiny_config(dataset, tmp_path / "run", "train.steps=1", "data.validation_cases=0", "wandb.mode=online",
                         "wandb.init_timeout=3")  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.monotonic()
        trainer = Trainer(config, Distributed())
        waited = time.monotonic() - started
        summary = trainer.fit()
    assert connections  # wandb did reach the server, which never answered
    assert waited < 45  # wandb's own default waits 90 s
    messages = captured_wandb_warnings(caught)
    assert len(messages) == 1, messages
    assert messages[0].startswith("W&B: could not start a run within wandb.init_timeout = 3 s (")
    assert summary["completed"] and "wandb_mode" not in summary
