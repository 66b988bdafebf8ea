"""``iunet3d demo``: the main job on built-in synthetic CT, as a real 2-process torchrun (gloo, CPU).

Writes the synthetic dataset to ``DIR/data`` (keeping cases already there), trains ``configs/demo.toml`` with the
run in ``DIR/run``, and prints a summary: steps, per-class validation Dice, throughput, checkpoints, and
how to upload the offline W&B run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from iunet3d.train.commands import add_config_arguments

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"
DEMO_CASES = 16
DEMO_SHAPE = (64, 160, 160)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, default=Path("demo"), help="data in DIR/data, the run in DIR/run")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (torchrun --nproc-per-node)")
    parser.add_argument("--cases", type=int, default=DEMO_CASES, help="synthetic cases, when DIR/data is absent")
    parser.add_argument("--shape", type=int, nargs=3, default=DEMO_SHAPE, metavar=("D", "H", "W"))
    parser.add_argument(
        "--slice-thickness", type=float, nargs="+", metavar="T",
        help="a demo of mixed spacings: case i has slices of T[i %% count] mm (field of view kept); training then "
        "resamples patches to the target spacing data.target_spacing = 'auto' chooses",
    )  # fmt: skip
    add_config_arguments(parser, required=False)
    parser.set_defaults(config=DEMO_CONFIG)


def run_demo(args: argparse.Namespace) -> int:
    from iunet3d.train.config import load_training_config

    if args.nproc < 1:
        raise ValueError(f"--nproc: expected a positive number, got {args.nproc}")
    directory = args.dir.resolve()
    data = directory / "data"
    overrides = [f"data.dataset={data}", f"run.dir={directory / 'run'}", *args.overrides]
    config = load_training_config(args.config, overrides)  # a bad config fails here, before any work
    data, run = Path(config.data.dataset), Path(config.run.dir)  # --set may have moved them
    started = time.perf_counter()
    # Idempotent: cases already complete are kept, so an interrupted demo picks up where it stopped.
    print(f"synthetic CT: {args.cases} cases in {data}", flush=True)
    shape = [str(size) for size in args.shape]
    thickness = ["--slice-thickness", *map(str, args.slice_thickness)] if args.slice_thickness else []
    _run([sys.executable, "-m", "iunet3d", "synth", "--out", str(data), "--cases", str(args.cases),
          "--shape", *shape, *thickness, "--no-progress"], "writing the synthetic dataset")  # fmt: skip
    (run / "summary.json").unlink(missing_ok=True)  # never report a previous run's results
    command = torchrun_command(args.nproc, args.config, overrides)
    print("running: " + " ".join(command), flush=True)
    _run(command, "training", environment=torchrun_environment())
    summary = json.loads((run / "summary.json").read_text())
    print(format_summary(summary, time.perf_counter() - started))
    return 0


def torchrun_command(nproc: int, config: Path, overrides: list[str]) -> list[str]:
    """``torchrun --standalone --nproc-per-node=N -m iunet3d train --config FILE --set ...``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "iunet3d", "train", "--config", str(config)]  # fmt: skip
    for override in overrides:
        command += ["--set", override]
    return command


def torchrun_environment() -> dict[str, str]:
    """One thread per process (2 cores, 2 ranks), and a fresh rendezvous store per restart (torch 2.13 reuses
    the old TCP store by default, and on gloo every restart then fails)."""
    environment = dict(os.environ)
    environment.setdefault("OMP_NUM_THREADS", "1")
    environment["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return environment


def _run(command: list[str], what: str, environment: dict | None = None) -> None:
    completed = subprocess.run(command, env=environment)
    if completed.returncode != 0:
        raise ValueError(f"{what} failed (exit code {completed.returncode}); see the messages above")


def format_summary(summary: dict, seconds: float) -> str:
    dice = {key.removeprefix("val/dice/"): value for key, value in summary.items() if key.startswith("val/dice/")}
    lines = [
        "",
        f"demo finished in {seconds / 60:.1f} min: {summary['step']} steps on {summary['world_size']} processes "
        f"({summary['device']})",
    ]
    if summary.get("steps_this_start"):
        lines.append(
            f"  throughput   {summary['patches_per_s']:.2f} patches/s, {summary['voxels_per_s'] / 1e6:.2f} Mvoxels/s; "
            f"peak memory {summary['peak_memory_mb']:.0f} MB per process"
        )
    else:
        lines.append(f"  (already complete: {summary['run_dir']} resumed at its last step and validated again)")
    if dice:
        lines.append(f"  validation   mean foreground Dice {summary['val/dice_mean']:.3f} on held-out cases")
        lines += [f"    {name:<12} {value:.3f}" for name, value in dice.items()]
    lines.append(f"  checkpoints  {summary['checkpoints']}")
    if summary.get("wandb_sync"):
        lines.append(f"  W&B run      {summary['wandb_id']}, offline in {summary['wandb_dir']}")
        lines.append(f"               upload it with: {summary['wandb_sync']}")
    elif summary.get("wandb_dir"):
        lines.append(f"  W&B run      {summary['wandb_id']} ({summary['wandb_mode']}), files in {summary['wandb_dir']}")
    if summary.get("wandb_dir") and summary.get("train_seconds"):
        spent, total = summary.get("dashboard_seconds", 0.0), summary["train_seconds"]
        lines.append(f"  dashboards   {spent:.1f} s of {total:.0f} s training ({spent / total:.2%}) on W&B tables, "
                     "panels and checkpoint artifacts")  # fmt: skip
    return "\n".join(lines)
