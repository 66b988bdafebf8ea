"""SIGTERM as SLURM, ``timeout``, a shell or Kubernetes send it, to a real 2-rank torchrun job whose ranks
stream patches through DataLoader workers: every rank stops after the same step with a checkpoint, no
process of the job is left, and training the same run directory again continues from that step.

torchrun starts every rank in a session of its own, and a rank's DataLoader workers are in the rank's
process group. Whoever signals the agent (its process group, or the agent alone), the agent forwards the
signal to each rank's process group, workers included, waits ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds
(default 30) for the ranks to exit and kills what is left with SIGKILL; then the agent itself exits 1.
SLURM signals every process of the job step directly: the third case.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from iunet3d.train.checkpoint import CheckpointManager
from tests.helpers.train import tiny_dataset
from tests.train.test_distributed_training import TEXT, environment, torchrun, train_command

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 12
SIGNAL_AFTER = 2  # steps done before the signal is sent
TIMEOUT = 240
#: One rank per process, one DataLoader worker per rank; checkpoints only at the end (or on preemption).
SETTINGS = ["data.num_workers=1", "data.validation_cases=0", f"train.steps={STEPS}", "train.checkpoint_every=1000",
            "wandb.mode=disabled"]  # fmt: skip
#: torchrun's agent: an uncaught SignalException after forwarding the signal and waiting for its ranks.
AGENT_EXIT_CODE_WHEN_SIGNALLED = 1


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("preemption") / "data", cases=3)


def process_table() -> dict[int, tuple[str, int, int]]:
    """Every process's (state, parent, process group), from ``/proc/PID/stat``."""
    found = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # exited meanwhile
            if entry.name.isdigit():
                state, parent, group = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
                found[int(entry.name)] = (state, int(parent), int(group))
    return found


def children(pid: int) -> list[int]:
    return [child for child, (_, parent, _) in process_table().items() if parent == pid]


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")


def descendants(pid: int) -> list[int]:
    found = children(pid)
    for child in list(found):
        found += descendants(child)
    return found


def running(pids: list[int], groups: list[int]) -> list[int]:
    """Those of ``pids``, and any process of the process groups ``groups``, that still run (zombies have
    ended; nothing here reaps an orphan that its new parent has not waited for yet)."""
    return [pid for pid, (state, _, group) in process_table().items()
            if state != "Z" and (pid in pids or group in groups)]  # fmt: skip


@pytest.fixture
def run_dir(tmp_path):
    """The run directory; after the test, a job still training in it (the test failed) is killed."""
    yield tmp_path / "run"
    for pid in process_table():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if f"run.dir={tmp_path / 'run'}" in command_line(pid):  # the agent and the ranks; workers then exit
                os.kill(pid, signal.SIGKILL)


def start_training(dataset: Path, run_dir: Path) -> tuple[subprocess.Popen, list[str]]:
    """A 2-rank torchrun in a session of its own, read until it printed step ``SIGNAL_AFTER``."""
    command = torchrun("--standalone", "--nproc-per-node=2", *train_command(dataset, run_dir, *SETTINGS))
    agent = subprocess.Popen(command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True, **TEXT)  # fmt: skip
    lines = []
    for line in agent.stdout:
        lines.append(line)
        if line.startswith(f"step {SIGNAL_AFTER}/"):
            return agent, lines
    agent.wait(timeout=TIMEOUT)
    pytest.fail(f"training ended before step {SIGNAL_AFTER}:\n" + "".join(lines)[-3000:])


def send_sigterm(to: str, agent: subprocess.Popen, processes: list[int]) -> None:
    if to == "process group":  # SLURM without cgroups, `timeout`, a shell: the agent's group
        os.killpg(agent.pid, signal.SIGTERM)
    elif to == "agent":  # Kubernetes, or `kill PID`
        os.kill(agent.pid, signal.SIGTERM)
    else:  # every process of the job, ranks and workers too, in no particular order (SLURM with cgroups)
        for pid in [*processes[::-1], agent.pid]:
            os.kill(pid, signal.SIGTERM)


@pytest.mark.parametrize("to", ["process group", "agent", "every process"])
def test_sigterm_saves_one_checkpoint_at_an_agreed_step_ends_every_process_and_the_run_resumes(dataset, run_dir, to):
    agent, lines = start_training(dataset, run_dir)
    ranks = children(agent.pid)
    processes = descendants(agent.pid)
    assert len(ranks) == 2, ranks
    workers = [pid for rank in ranks for pid in children(rank) if "spawn_main" in command_line(pid)]
    assert len(workers) == 2, "every rank has its DataLoader worker running"
    signalled = time.monotonic()
    send_sigterm(to, agent, processes)
    output = "".join(lines) + agent.communicate(timeout=TIMEOUT)[0]
    stopped_after = time.monotonic() - signalled

    assert agent.returncode == AGENT_EXIT_CODE_WHEN_SIGNALLED, output[-3000:]
    assert "killed by signal" not in output, output[-3000:]  # no DataLoader worker died of the signal
    assert "forcefully exiting" not in output  # the ranks exited within the agent's grace period...
    assert stopped_after < 30, stopped_after  # ...(TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default)
    steps = CheckpointManager(run_dir / "checkpoints").steps()
    assert len(steps) == 1 and SIGNAL_AFTER <= steps[0] < STEPS, steps
    stopped = steps[0]
    assert f"SIGTERM: stopped at step {stopped} after saving a checkpoint" in output
    state = torch.load(run_dir / "checkpoints" / f"step-{stopped}.pt", weights_only=True)
    assert state["step"] == stopped and len(state["rng"]) == 2  # both ranks took part in the save at that step
    summary = (run_dir / "summary.json").read_text()
    assert '"stopped_by": "SIGTERM"' in summary and f'"step": {stopped}' in summary
    left = running([agent.pid, *processes], groups=[agent.pid, *ranks])  # each rank leads a group of its own
    assert not left, f"processes of the job still running: {left}"

    resumed = subprocess.run(torchrun("--standalone", "--nproc-per-node=2", *train_command(dataset, run_dir,
                                                                                          *SETTINGS)),
                             env=environment(), capture_output=True, timeout=TIMEOUT, **TEXT)  # fmt: skip
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{stopped}.pt'} at step {stopped}" in output
    assert CheckpointManager(run_dir / "checkpoints").steps() == [stopped, STEPS]
    assert torch.load(run_dir / "checkpoints" / f"step-{STEPS}.pt", weights_only=True)["step"] == STEPS
    assert '"completed": true' in (run_dir / "summary.json").read_text()


LOADER_SCRIPT = """
import os, subprocess, sys, time
from functools import partial
from pathlib import Path

from iunet3d.patches import PatchLoader, PatchStream


def note_pid(path, worker_id):
    Path(path).write_text(str(os.getpid()))


if __name__ == "__main__":
    dataset, marker = sys.argv[1], Path(sys.argv[2])
    stream = PatchStream(dataset, patch_size=(8, 32, 32), transform=None)
    loader = PatchLoader(stream, batch_size=2, num_workers=1, worker_init_fn=partial(note_pid, marker))
    next(loader)
    for name in ("TERM", "INT"):  # from another process, as SLURM, a shell or torchrun's agent send them
        subprocess.run(["kill", f"-{name}", marker.read_text()], check=True)
    time.sleep(1)
    for _ in range(3):
        next(loader)
    print("batches after the signals", flush=True)
    # the loader is left open: the interpreter must still exit, and stop its worker
"""


def test_a_patch_loader_worker_ignores_sigterm_and_sigint_and_still_ends_with_its_process(dataset, tmp_path):
    """Outside torchrun: the worker keeps delivering batches after both signals, a ``worker_init_fn`` given
    to the loader still runs, and a loader never closed neither hangs the interpreter's exit (the worker
    ignores multiprocessing's SIGTERM there too) nor outlives it."""
    script, marker = tmp_path / "loader.py", tmp_path / "worker.pid"
    script.write_text(LOADER_SCRIPT)
    completed = subprocess.run([sys.executable, str(script), str(dataset), str(marker)], env=environment(),
                               capture_output=True, timeout=90, **TEXT)  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "batches after the signals" in completed.stdout
    assert running([int(marker.read_text())], groups=[]) == []
