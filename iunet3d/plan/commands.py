"""``iunet3d plan``: a training config chosen for a dataset and a memory budget, and ``--check`` of one."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

from iunet3d.data.staging import write_text_atomically


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", nargs="?", type=Path, help="a dataset written by `iunet3d convert` or `synth`")
    parser.add_argument("--memory", type=float, metavar="GB", help="memory budget per device (GB = 2^30 bytes)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="where training runs (default: cuda if available)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast on CUDA (CPU: fp32)")
    parser.add_argument("--gpus", type=int, default=1, help="devices per job (the budget is per device)")
    parser.add_argument("--depth", type=int, help="couplings per level: costs step time, not activation memory")
    parser.add_argument("--channels", type=int, help="feature channels at full resolution")
    parser.add_argument("--out", type=Path, help="write the config here (default: print it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument(
        "--calibration", type=Path, metavar="JSON",
        help="the fitted memory model: read from this file if it exists, else measured and written to it",
    )  # fmt: skip
    parser.add_argument("--check", type=Path, metavar="FILE", help="measure a config's peak memory and step time")


def _device(args: argparse.Namespace) -> str:
    if args.device is not None:
        return args.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_plan(args: argparse.Namespace) -> int:
    if args.check is not None:
        return _run_check(args)
    if args.dataset is None or args.memory is None:
        raise ValueError("plan: give a DATASET and --memory GB (or --check FILE)")
    if not args.memory > 0 or not math.isfinite(args.memory):
        raise ValueError(f"--memory: expected a positive number of GB, got {args.memory}")
    if args.out is not None and args.out.exists() and not args.overwrite:
        raise ValueError(f"--out {args.out}: exists; pass --overwrite to replace it")
    from iunet3d.data.dataset import open_dataset
    from iunet3d.plan.config_file import plan_toml
    from iunet3d.plan.planner import calibration_base, plan_training

    device = _device(args)
    dataset = open_dataset(args.dataset)
    model = _memory_model(args, calibration_base(dataset, device, args.precision, args.depth, args.channels), device)
    plan = plan_training(dataset, args.memory * 2**30, device, args.precision, args.gpus, model=model,
                         depth=args.depth, channels=args.channels)  # fmt: skip
    command = "iunet3d plan " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else "iunet3d plan"
    text = plan_toml(plan, command, [f"memory model: {model.describe()}"] if hasattr(model, "describe") else None)
    spacing = " x ".join(f"{s:g}" for s in plan.config.data.target_spacing)
    print(
        f"{dataset.path}: patch {' x '.join(map(str, plan.patch_size))} at {spacing} mm, batch {plan.batch_size}, "
        f"{len(plan.architecture)} levels x {plan.architecture[0]} couplings, predicted peak "
        f"{plan.predicted_peak_bytes / 2**30:.2f} of {args.memory:.2f} GB",
        file=sys.stderr,
    )
    if args.out is None:
        print(text)
    else:
        write_text_atomically(args.out, text)
        print(f"wrote {args.out}; measure it with: iunet3d plan --check {args.out}", file=sys.stderr)
    return 0


def _memory_model(args: argparse.Namespace, base, device: str):
    """The fitted memory model: read from ``--calibration`` when it exists, else calibrated (and saved there)."""
    from iunet3d.plan.memory_model import MemoryModel, calibrate

    if args.calibration is not None and args.calibration.exists():
        try:
            return MemoryModel.from_dict(json.loads(args.calibration.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"--calibration {args.calibration}: not a memory model file ({error})") from None
    print(f"calibrating the memory model on {device} (short probe runs)...", file=sys.stderr, flush=True)
    model, _ = calibrate(base, device)
    if args.calibration is not None:
        write_text_atomically(args.calibration, json.dumps(model.to_dict(), indent=1))
    return model


def _run_check(args: argparse.Namespace) -> int:
    from iunet3d.plan.check import check_config, read_budget, read_predicted
    from iunet3d.train.config import load_training_config

    path = args.check
    if not path.is_file():
        raise ValueError(f"--check {path}: no such config file")
    config = load_training_config(path)  # a bad config fails here, in one line
    budget = args.memory * 2**30 if args.memory is not None else read_budget(path)
    if budget is None:
        raise ValueError(f"--check {path}: no '# plan: budget_bytes = N' line (not written by `iunet3d plan`): "
                         "pass --memory GB")  # fmt: skip
    if args.device is None and config.train.device != "auto":
        args.device = config.train.device
    report = check_config(path, _device(args), int(budget), predicted_bytes=read_predicted(path))
    print(report)
    return 1 if "EXCEEDS" in report else 0
