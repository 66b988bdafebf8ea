"""Real torchrun jobs (gloo, CPU): DDP gradients, the demo command, crash-and-resume, two c10d agents,
SIGTERM, and the W&B offline run read back from its files.

The reference run is the demo command itself at tiny settings (2 ranks, 1 DataLoader worker each); the
crash-and-resume and two-node runs use the same config with in-process loading (0 workers) and must end
with bit-identical parameters, which also shows the data stream does not depend on the worker count.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from iunet3d.train.checkpoint import CheckpointManager
from iunet3d.train.loss import DiceCELoss
from iunet3d.train.trainer import CRASH_ENV
from tests.helpers.ddp_gradients_worker import ENGINES, MODES, gradients, micro_batches, network_and_batch
from tests.helpers.train import DEMO_CONFIG, TINY, overrides
from tests.helpers.wandb_records import (
    read_logged_table,
    read_offline_config,
    read_offline_history,
    read_offline_run_ids,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 6
RUN = [
    "train.steps=6",
    "train.checkpoint_every=2",
    "validation.every=3",
    "wandb.mode=offline",
    "data.validation_cases=2",
]
TIMEOUT = 300
TEXT = {"text": True, "errors": "replace"}  # a rank killed mid-write may leave half a UTF-8 character


LAUNCH = Path(__file__).resolve().parents[2] / "launch"


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # torchrun and python of this venv
    env.update(OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", WANDB_SILENT="true",
               WANDB_DISABLE_GIT="true", WANDB__DISABLE_STATS="true", WANDB__DISABLE_META="true", **extra)  # fmt: skip
    return env


def torchrun(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *arguments]


def train_command(dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["-m", "iunet3d", "train", "--config", str(DEMO_CONFIG), *set_arguments(dataset, run_dir, *extra)]


def launch_script(script: str, dataset: Path, run_dir: Path) -> list[str]:
    """``launch/<script> CONFIG --set ...``."""
    return ["bash", str(LAUNCH / script), str(DEMO_CONFIG), *set_arguments(dataset, run_dir)]


def set_arguments(dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    arguments = []
    for override in overrides(dataset, run_dir, *RUN, *extra):
        arguments += ["--set", override]
    return arguments


def run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    completed = subprocess.run(command, env=environment(**env), capture_output=True, timeout=TIMEOUT, **TEXT)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed


def final_parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    path, state = CheckpointManager(run_dir / "checkpoints").load_latest()
    assert state["step"] == STEPS, path
    return state["model"]


def assert_same_parameters(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """``iunet3d demo`` at tiny settings: synthetic data in DIR/data, a 2-process torchrun in DIR/run."""
    directory = tmp_path_factory.mktemp("demo")
    command = [sys.executable, "-m", "iunet3d", "demo", "--dir", str(directory), "--cases", "4", "--shape", "16", "48",
               "48"]  # fmt: skip
    for override in [*TINY, *RUN, "data.num_workers=1"]:
        command += ["--set", override]
    completed = run(command)
    return directory, completed.stdout


def test_ddp_gradients_equal_single_process_gradients_on_the_combined_batch(tmp_path):
    """Both engines: DDP's gradients are bit-identical to one process computing each rank's share and
    averaging as DDP does (g0 / 2 + g1 / 2, in one thread as the ranks run), equal to the gradient of the
    combined batch up to float rounding, and the two engines agree."""
    worker = Path(__file__).parents[1] / "helpers" / "ddp_gradients_worker.py"
    run(torchrun("--standalone", "--nproc-per-node=2", str(worker), str(tmp_path)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        combined = {}
        for engine in ENGINES:
            network, image, label = network_and_batch(engine)
            DiceCELoss()(network(image), label).backward()
            combined[engine] = gradients(network)
            for mode in MODES:
                shares = []
                for rank in (0, 1):
                    network, image, label = network_and_batch(engine)
                    micros = micro_batches(rank, mode)
                    for micro in micros:
                        (DiceCELoss()(network(image[micro]), label[micro]) / len(micros)).backward()
                    shares.append(gradients(network))
                rank0, rank1 = (torch.load(tmp_path / f"grads-{engine}-{mode}-{r}.pt") for r in (0, 1))
                for name, value in combined[engine].items():
                    assert torch.equal(rank0[name], rank1[name]), (engine, mode, name)  # synchronised
                    assert torch.equal(rank0[name], shares[0][name] / 2 + shares[1][name] / 2), (engine, mode, name)
                    assert torch.allclose(rank0[name], value, rtol=1e-4, atol=1e-7), (engine, mode, name)
    finally:
        torch.set_num_threads(threads)
    assert any(value.abs().max() > 1e-3 for value in combined["fused"].values())
    for name, value in combined["fused"].items():
        assert torch.allclose(value, combined["memcnn"][name], rtol=1e-4, atol=1e-7), name


def test_the_demo_trains_validates_and_prints_its_summary(demo):
    directory, stdout = demo
    assert (directory / "data" / "zarr.json").exists()
    assert "demo finished" in stdout and "6 steps on 2 processes" in stdout
    for name in ("liver", "kidney", "lesion"):
        assert f"    {name}" in stdout
    assert "mean foreground Dice" in stdout
    assert f"wandb sync {directory / 'run' / 'wandb'}/offline-run-*" in stdout
    assert CheckpointManager(directory / "run" / "checkpoints").steps() == [2, 4, 6]


def test_whole_volume_validation_sums_both_ranks_held_out_cases(demo):
    """Each rank predicts one of the 2 held-out cases whole; the logged Dice is that of both together."""
    from iunet3d.data import open_dataset
    from iunet3d.infer.case_metrics import volume_confusion_counts
    from iunet3d.infer.dice import dice_scores
    from iunet3d.infer.trained_model import load_trained_model, predict_volume
    from iunet3d.patches import split_cases
    from iunet3d.train.config import load_training_config

    run_dir = demo[0] / "run"
    config = load_training_config(run_dir / "config.toml")
    dataset = open_dataset(config.data.dataset)
    held_out = split_cases(dataset.case_names, 2, config.data.split_seed)[1]
    model = load_trained_model(run_dir / "checkpoints" / "step-6.pt")
    counts = sum(volume_confusion_counts(predict_volume(model, dataset.case(name).image_array),
                                         dataset.case(name).label_array()[...], 4) for name in held_out)  # fmt: skip
    summary = json.loads((run_dir / "summary.json").read_text())
    for name, value in dice_scores(counts, model.class_names).items():
        assert summary[f"val/dice/{name}"] == pytest.approx(value, nan_ok=True), name


def test_the_offline_wandb_run_holds_the_logged_keys_at_their_steps(demo):
    run_dir = demo[0] / "run"
    (run_id,) = read_offline_run_ids(run_dir)
    assert run_id == torch.load(run_dir / "checkpoints" / "step-6.pt", weights_only=True)["wandb_id"]
    history = read_offline_history(run_dir, run_id)
    steps_with = lambda key: sorted(row["_step"] for row in history if key in row)  # noqa: E731
    assert steps_with("train/loss") == list(range(1, STEPS + 1))  # train.log_every = 1
    for key in ("train/lr", "perf/patches_per_s", "perf/voxels_per_s", "perf/peak_memory_mb"):
        assert steps_with(key) == list(range(1, STEPS + 1)), key
    for key in ("val/dice_mean", "val/dice/liver", "val/dice/kidney", "val/dice/lesion",
                "health/reconstruction_error", "health/reconstruction_error/level_0"):  # fmt: skip
        assert steps_with(key) == [3, 6], key
    assert all(0 < row["health/reconstruction_error"] < 1e-5 for row in history if "health/reconstruction_error" in row)
    for key in ("train/loss_dice", "train/loss_ce", "train/grad_norm", "train/grad_norm_max"):
        assert steps_with(key) == list(range(1, STEPS + 1)), key
    assert steps_with("val/cases") == [3, 6] and steps_with("val/classes") == [3, 6]
    # The case table holds both ranks' held-out cases, each with its own Dice from the step-6 network.
    from iunet3d.data import open_dataset
    from iunet3d.infer.case_metrics import volume_confusion_counts
    from iunet3d.infer.dice import dice_scores
    from iunet3d.infer.trained_model import load_trained_model, predict_volume
    from iunet3d.patches import split_cases
    from iunet3d.train.config import load_training_config

    config = load_training_config(run_dir / "config.toml")
    dataset = open_dataset(config.data.dataset)
    held_out = split_cases(dataset.case_names, 2, config.data.split_seed)[1]
    model = load_trained_model(run_dir / "checkpoints" / "step-6.pt")
    table = read_logged_table(
        run_dir, next(row["val/cases"] for row in history if row["_step"] == 6 and "val/cases" in row)
    )
    assert [line[0] for line in table["data"]] == held_out
    for name, line in zip(held_out, table["data"], strict=True):
        case = dataset.case(name)
        own = dice_scores(volume_confusion_counts(predict_volume(model, case.image_array), case.label_array()[...], 4),
                          model.class_names)  # fmt: skip
        for class_name, value in own.items():
            logged = line[table["columns"].index(f"dice/{class_name}")]
            assert (logged is None and value != value) or logged == pytest.approx(value), (name, class_name)
        assert line[-1]["_type"] == "image-file"  # both cases are among the 8 worst: both have panels
    config = read_offline_config(run_dir, run_id)
    assert config["train"]["steps"] == STEPS and config["data"]["dataset"] == str(demo[0] / "data")


def test_a_worker_killed_mid_run_is_restarted_and_ends_equal_to_the_uninterrupted_run(demo, tmp_path):
    dataset, reference = demo[0] / "data", demo[0] / "run"
    run_dir = tmp_path / "run"
    completed = run(
        launch_script("single_node.sh", dataset, run_dir),
        NPROC="2",
        MAX_RESTARTS="1",
        **{CRASH_ENV: "1:3"},  # rank 1 exits abruptly after step 3; the newest checkpoint is step 2
    )
    output = completed.stdout + completed.stderr
    assert "exits abruptly after step 3" in output
    assert f"resumed from {run_dir / 'checkpoints' / 'step-2.pt'} at step 2" in output
    assert_same_parameters(final_parameters(run_dir), final_parameters(reference))
    assert len(read_offline_run_ids(run_dir)) == 1  # the restart continued the same W&B run
    steps = sorted(row["_step"] for row in read_offline_history(run_dir) if "train/loss" in row)
    assert steps[-1] == STEPS and set(steps) == set(range(1, STEPS + 1))


def test_two_torchrun_agents_on_localhost_act_as_two_nodes(demo, tmp_path):
    dataset, reference = demo[0] / "data", demo[0] / "run"
    node = environment(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
                       RDZV_ID="two-nodes", MAX_RESTARTS="0")  # fmt: skip
    command = launch_script("multi_node.sh", dataset, tmp_path / "run")
    agents = [subprocess.Popen(command, env=node, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **TEXT)
              for _ in range(2)]  # fmt: skip
    outputs = [agent.communicate(timeout=TIMEOUT)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(output[-2000:] for output in outputs)
    assert_same_parameters(final_parameters(tmp_path / "run"), final_parameters(reference))


def worker_pids(agent_pid: int) -> list[int]:
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    return [int(pid) for pid in children]


def test_sigterm_stops_every_rank_at_the_same_step_with_a_checkpoint_and_exit_code_0(demo, tmp_path):
    run_dir = tmp_path / "run"
    command = torchrun("--standalone", "--nproc-per-node=2",
                       *train_command(demo[0] / "data", run_dir, "train.steps=100000",
                                      "train.checkpoint_every=100000"))  # fmt: skip
    agent = subprocess.Popen(command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **TEXT)
    lines = []
    for line in agent.stdout:
        lines.append(line)
        if line.startswith("step 2/"):
            break
    workers = worker_pids(agent.pid)
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGTERM)  # preemption reaches one rank first...
    time.sleep(0.5)
    os.kill(workers[1], signal.SIGTERM)  # ...and the other later
    output = "".join(lines) + agent.communicate(timeout=TIMEOUT)[0]
    assert agent.returncode == 0, output[-3000:]
    steps = CheckpointManager(run_dir / "checkpoints").steps()
    assert len(steps) == 1 and 2 <= steps[0] < 100000
    assert f"SIGTERM: stopped at step {steps[0]} after saving a checkpoint" in output
    summary = (run_dir / "summary.json").read_text()
    assert '"stopped_by": "SIGTERM"' in summary and f'"step": {steps[0]}' in summary


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh", "slurm.sbatch"])
def test_the_launch_scripts_parse_and_give_restarts_a_fresh_store(script):
    text = (LAUNCH / script).read_text()
    assert subprocess.run(["bash", "-n", str(LAUNCH / script)]).returncode == 0
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in text and "-m iunet3d train --config" in text
    if script != "single_node.sh":
        assert "--rdzv-backend=c10d" in text and "--rdzv-id=" in text and "--max-restarts=" in text


def test_predict_under_torchrun_shares_the_cases_out_and_writes_one_dataset(demo, tmp_path):
    """Each of 2 ranks predicts its share of the 4 demo cases; the output equals one process's."""
    from iunet3d.data import open_dataset
    from iunet3d.infer.sharding import shard_cases
    from iunet3d.infer.trained_model import load_trained_model, predict_volume

    directory = demo[0]
    checkpoint, data, out = directory / "run" / "checkpoints" / "step-6.pt", directory / "data", tmp_path / "out"
    completed = run(torchrun("--standalone", "--nproc-per-node=2", "-m", "iunet3d", "predict", "--checkpoint",
                             str(checkpoint), "--input", str(data), "--out", str(out), "--no-progress"))  # fmt: skip
    dataset = open_dataset(data)
    shards = shard_cases({name: 1 for name in dataset.case_names}, 2)  # equal sizes: 2 cases per rank
    for rank, shard in enumerate(shards):
        predicted = re.findall(rf"\[rank {rank}\] \[\d/\d\] (\S+) ", completed.stdout)
        assert predicted == shard and len(shard) == 2, completed.stdout
    assert open_dataset(out).case_names == dataset.case_names and not (out / ".partial").exists()
    model = load_trained_model(checkpoint)
    for name in dataset.case_names:
        expected = predict_volume(model, dataset.case(name).image_array)
        assert np.array_equal(open_dataset(out).case(name).label_array("prediction")[...], expected), name
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    assert [row["case"] for row in rows] == [name for name in dataset.case_names for _ in model.class_names[1:]]
