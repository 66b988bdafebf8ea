"""``iunet3d bench plan``: nnU-Net v2's 3d_fullres plan vs ours, at the same measured training memory.

Per dataset:

1. nnU-Net plans it with its own code (``iunet3d.bench.nnunet_plan``: the dataset exported in nnU-Net's raw
   layout, its fingerprint, its default ``ExperimentPlanner`` with its default GPU memory target), and its
   network is built from that plan by its own code.
2. The probe harness (``iunet3d.plan.probe.measure_training``) trains nnU-Net's network at its planned patch,
   batch and target spacing on batches from our loader, with SGD (what nnU-Net trains with; the harness's
   SGD keeps one momentum buffer per parameter, as nnU-Net's does), and measures its peak memory.
3. Our planner (``plan_training``) plans for that measured peak as the budget; when our network would have
   fewer layers than nnU-Net's, it plans again with just enough couplings per level. The same harness
   measures our plan with AdamW (what ``iunet3d train`` uses).

Both run the same loss, loader and step. "Layers" counts the convolutions on the deepest input-to-output
path: nnU-Net: encoder + decoder convolutions, one transposed convolution per upsampling, the 1x1x1 head;
ours: the 3x3x3 input convolution, couplings x block_depth convolutions on the way down and up at every
level, one down- and one upsampling per level transition, the 1x1x1 head (channel mixings not counted).

The target: our patch holds >= 4x nnU-Net's voxels, our network has at least as many layers, and our measured
peak stays within nnU-Net's (``MEMORY_TOLERANCE`` for measurement noise).

CPU: nnU-Net's plan is made for an 8 GB GPU; one of its training steps at its full patch takes minutes on a
few cores, so each configuration runs ``--steps`` (default 2) steps: the second one holds the optimizer
state and every gradient, so the peak includes all of it.

``--json``: one line ``{"nnunetv2": version, "device", "steps", "datasets": [ENTRY, ...], "target_met"}``, one
ENTRY per dataset with ``dataset``, ``patch_voxels_ours``, ``patch_voxels_nnunet``, ``batch_ours``,
``batch_nnunet``, ``peak_mb_ours``, ``peak_mb_nnunet``, ``layers_ours``, ``layers_nnunet``, ``patch_ours``,
``patch_nnunet``, ``spacing_ours``, ``spacing_nnunet``, ``patch_ratio``, ``target_met`` and more.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

TARGET_RATIO = 4.0  #: our patch voxels / nnU-Net's, at equal measured memory
MEMORY_TOLERANCE = 1.05  #: our measured peak may exceed nnU-Net's by this factor (measurement noise)
NNUNET_OPTIMIZER = "sgd"
OUR_OPTIMIZER = "adamw"
NNUNET_ID_BASE = 990
BUILDER = "iunet3d.bench.nnunet_plan:build_nnunet_network"
#: The default synthetic datasets: name -> ``iunet3d synth`` options. 128 x 512 x 512 voxels at 2.5 x 0.8 x 0.8 mm
#: (320 x 410 x 410 mm): nnU-Net's 3d_fullres patch (about 2 M voxels) is bounded by its memory target, not by the
#: median case, and the cases (33 M voxels) leave room for a patch 4x and more of nnU-Net's. (At 64 x 256 x 256,
#: measured: ours took the whole case, 2.03x nnU-Net's patch, and grew the batch.)
SYNTH_DATASETS = {
    "anisotropic": ["--cases", "3", "--shape", "128", "512", "512", "--spacing", "2.5", "0.8", "0.8"],
    "mixed": ["--cases", "3", "--shape", "128", "512", "512", "--spacing", "2.5", "0.8", "0.8",
              "--slice-thickness", "1", "2.5", "5"],
}  # fmt: skip


@dataclass
class Side:
    """One network's plan and its measurement."""

    patch_size: tuple[int, int, int]  #: z, y, x voxels
    batch_size: int
    spacing: tuple[float, float, float]  #: target spacing, z, y, x mm
    layers: int  #: convolutions on the deepest input-to-output path
    network: str  #: a short description of the network
    optimizer: str
    peak_mb: float | None  #: measured peak (CPU: summed RSS of the process tree; CUDA: max allocated)
    baseline_mb: float | None  #: after imports and building, before the first step
    step_s: float | None
    parameters: int | None
    predicted_peak_mb: float | None = None  #: ours: the planner's prediction
    error: str | None = None  #: the measurement failed

    @property
    def patch_voxels(self) -> int:
        return math.prod(self.patch_size)

    @property
    def patch_mm(self) -> tuple[float, float, float]:
        return tuple(p * s for p, s in zip(self.patch_size, self.spacing, strict=True))


@dataclass
class Comparison:
    dataset: str
    path: str
    nnunet: Side
    ours: Side
    nnunet_planning_s: float
    budget_mb: float  #: what our planner was given: nnU-Net's measured peak

    @property
    def patch_ratio(self) -> float:
        return self.ours.patch_voxels / self.nnunet.patch_voxels

    @property
    def memory_ratio(self) -> float | None:
        if self.ours.peak_mb is None or self.nnunet.peak_mb is None:
            return None
        return self.ours.peak_mb / self.nnunet.peak_mb

    @property
    def target_met(self) -> bool:
        memory = self.memory_ratio
        return (
            self.patch_ratio >= TARGET_RATIO
            and self.ours.layers >= self.nnunet.layers
            and memory is not None
            and memory <= MEMORY_TOLERANCE
        )

    def to_dict(self) -> dict:
        entry = {"dataset": self.dataset, "path": self.path}
        for suffix, side in (("nnunet", self.nnunet), ("ours", self.ours)):
            values = asdict(side)
            entry.update({
                f"patch_voxels_{suffix}": side.patch_voxels, f"batch_{suffix}": side.batch_size,
                f"step_voxels_{suffix}": side.patch_voxels * side.batch_size,
                f"peak_mb_{suffix}": side.peak_mb, f"layers_{suffix}": side.layers,
                f"patch_{suffix}": list(side.patch_size), f"spacing_{suffix}": list(side.spacing),
                f"patch_mm_{suffix}": [round(v, 1) for v in side.patch_mm],
            })  # fmt: skip
            for key in ("network", "optimizer", "baseline_mb", "step_s", "parameters", "predicted_peak_mb", "error"):
                entry[f"{key}_{suffix}"] = values[key]
        entry.update({"budget_mb": self.budget_mb, "nnunet_planning_s": round(self.nnunet_planning_s, 1),
                      "patch_ratio": round(self.patch_ratio, 3), "memory_ratio": self.memory_ratio,
                      "target_met": self.target_met})  # fmt: skip
        return entry


# ----- layer counts ------------------------------------------------------------------------------------


def iunet_conv_layers(architecture, block_depth: int) -> int:
    """Convolutions on the deepest path of ``SegmentationIUNet``: input conv, ``architecture[i]`` couplings of
    ``block_depth`` convolutions on the way down and up at every level, a down- and an upsampling per level
    transition, the output conv."""
    levels = len(architecture)
    return 1 + 2 * sum(architecture) * block_depth + 2 * (levels - 1) + 1


def depth_for_layers(layers: int, levels: int, block_depth: int) -> int:
    """The fewest couplings per level (the same at every level) that give at least ``layers`` layers."""
    couplings = max(0, layers - 2 - 2 * (levels - 1))
    return max(1, math.ceil(couplings / (2 * levels * block_depth)))


# ----- formatting --------------------------------------------------------------------------------------


def _shape(values) -> str:
    return " x ".join(f"{v:g}" for v in values)


def _mb(value: float | None) -> str:
    return "failed" if value is None else f"{value:,.0f}"


def format_table(comparison: Comparison, version: str) -> str:
    """A Markdown table: nnU-Net's plan and ours side by side, then the ratio and whether the target is met."""
    n, o = comparison.nnunet, comparison.ours
    rows = [
        ("target spacing (z, y, x mm)", _shape(round(v, 3) for v in n.spacing), _shape(round(v, 3) for v in o.spacing)),
        ("patch (z, y, x voxels)", _shape(n.patch_size), _shape(o.patch_size)),
        ("patch voxels", f"{n.patch_voxels:,}", f"{o.patch_voxels:,}"),
        ("patch field of view (mm)", _shape(round(v) for v in n.patch_mm), _shape(round(v) for v in o.patch_mm)),
        ("batch", str(n.batch_size), str(o.batch_size)),
        ("voxels per step (batch x patch)", f"{n.batch_size * n.patch_voxels:,}", f"{o.batch_size * o.patch_voxels:,}"),
        ("layers (convolutions, deepest path)", str(n.layers), str(o.layers)),
        ("network", n.network, o.network),
        ("parameters", _millions(n.parameters), _millions(o.parameters)),
        ("optimizer", n.optimizer, o.optimizer),
        ("measured peak MB", _mb(n.peak_mb), _mb(o.peak_mb)),
        ("  of which baseline MB (imports, network)", _mb(n.baseline_mb), _mb(o.baseline_mb)),
        ("predicted peak MB", "-", _mb(o.predicted_peak_mb)),
        ("step s", _seconds(n.step_s), _seconds(o.step_s)),
    ]
    lines = [
        f"## {comparison.dataset} ({comparison.path})",
        "",
        f"nnU-Net v2 {version} 3d_fullres (planned in {comparison.nnunet_planning_s:.0f} s) vs iunet3d planned for "
        f"nnU-Net's measured peak ({comparison.budget_mb:,.0f} MB)",
        "",
        "| | nnU-Net 3d_fullres | iunet3d |",
        "|---|---|---|",
        *(f"| {name} | {left} | {right} |" for name, left, right in rows),
        "",
    ]
    memory = comparison.memory_ratio
    lines.append(
        f"patch voxels iunet3d / nnU-Net: {comparison.patch_ratio:.2f}x (target >= {TARGET_RATIO:g}x); layers "
        f"{o.layers} vs {n.layers}; measured peak iunet3d / nnU-Net: "
        + ("n/a" if memory is None else f"{memory:.2f}")
        + f" (<= {MEMORY_TOLERANCE:g}); target {'met' if comparison.target_met else 'NOT met'}"
    )
    for name, side in (("nnU-Net", n), ("iunet3d", o)):
        if side.error:
            lines.append(f"{name} measurement failed: {side.error}")
    return "\n".join(lines)


def _millions(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1e6:.2f} M"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


# ----- running -----------------------------------------------------------------------------------------


def _measure(config, args: argparse.Namespace, optimizer: str, builder: dict | None = None):
    """(Measurement or None, error or None): one probe of ``config``."""
    from iunet3d.plan.probe import ProbeError, measure_training

    try:
        return measure_training(config, device=args.device, steps=args.steps, builder=builder, optimizer=optimizer,
                                timeout_s=args.timeout), None  # fmt: skip
    except ProbeError as error:
        return None, str(error)


def _side(plan_values: dict, measurement, error: str | None) -> Side:
    measured = measurement is not None
    return Side(
        **plan_values,
        peak_mb=round(measurement.peak_bytes / 2**20, 1) if measured else None,
        baseline_mb=round(measurement.baseline_bytes / 2**20, 1) if measured else None,
        step_s=round(measurement.step_seconds, 2) if measured else None,
        parameters=measurement.num_parameters if measured else None,
        error=error,
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compare_dataset(dataset_path: Path, name: str, index: int, work_dir: Path, args: argparse.Namespace) -> Comparison:
    """Plan ``dataset_path`` with nnU-Net, measure its network, plan ours for that peak, measure ours."""
    from iunet3d.bench.nnunet_plan import export_raw_dataset, plan_nnunet
    from iunet3d.data.dataset import open_dataset
    from iunet3d.plan.memory_model import calibrate
    from iunet3d.plan.planner import base_config, calibration_base, plan_training

    dataset = open_dataset(dataset_path)
    _log(f"[{name}] exporting {len(dataset)} cases in nnU-Net's raw layout under {work_dir}")
    raw = export_raw_dataset(dataset, work_dir, NNUNET_ID_BASE + index, name)
    _log(f"[{name}] nnU-Net fingerprint + 3d_fullres plan")
    nnunet = plan_nnunet(raw, num_processes=args.processes)
    _log(f"[{name}] nnU-Net: patch {_shape(nnunet.patch_size)} batch {nnunet.batch_size} spacing "
         f"{_shape(nnunet.spacing)} ({nnunet.planning_seconds:.0f} s); measuring its training ({args.steps} "
         "steps)")  # fmt: skip
    base = base_config(dataset, args.device)
    spacing = tuple(round(v, 6) for v in nnunet.spacing)
    nnunet_config = replace(base, data=replace(base.data, patch_size=nnunet.patch_size,
                                               batch_size=nnunet.batch_size, target_spacing=spacing))  # fmt: skip
    builder = {"builder": BUILDER, "kwargs": {"plans_file": nnunet.plans_file}}
    measured, error = _measure(nnunet_config, args, NNUNET_OPTIMIZER, builder)
    features = nnunet.features_per_stage
    nnunet_side = _side({
        "patch_size": nnunet.patch_size, "batch_size": nnunet.batch_size, "spacing": spacing,
        "layers": nnunet.conv_layers, "optimizer": f"{NNUNET_OPTIMIZER} (nnU-Net's)",
        "network": f"PlainConvUNet {nnunet.n_stages} stages, {features[0]}-{max(features)} features",
    }, measured, error)  # fmt: skip
    if measured is None:
        raise ValueError(f"bench plan: measuring nnU-Net's network on {name} failed: {error}")
    _log(f"[{name}] nnU-Net peak {nnunet_side.peak_mb:,.0f} MB, {nnunet_side.step_s} s/step; planning ours for it")
    budget = measured.peak_bytes
    _log(f"[{name}] calibrating our memory model on {args.device}")
    memory_model, _ = calibrate(calibration_base(dataset, args.device), args.device)  # fitted once, for both plans
    plan = plan_training(dataset, budget, device=args.device, precision="fp32", model=memory_model)
    model = plan.config.model
    if iunet_conv_layers(model.architecture, model.block_depth) < nnunet.conv_layers:
        depth = depth_for_layers(nnunet.conv_layers, len(model.architecture), model.block_depth)
        _log(f"[{name}] ours has fewer layers than nnU-Net's {nnunet.conv_layers}: planning with depth {depth}")
        plan = plan_training(dataset, budget, device=args.device, precision="fp32", model=memory_model, depth=depth)
        model = plan.config.model
    _log(f"[{name}] ours: patch {_shape(plan.patch_size)} batch {plan.batch_size} architecture "
         f"{list(model.architecture)}; measuring its training")  # fmt: skip
    measured_ours, error_ours = _measure(plan.config, args, OUR_OPTIMIZER)
    ours_side = _side({
        "patch_size": tuple(plan.patch_size), "batch_size": plan.batch_size,
        "spacing": tuple(plan.config.data.target_spacing),
        "layers": iunet_conv_layers(model.architecture, model.block_depth), "optimizer": OUR_OPTIMIZER,
        "network": f"iUNet {len(model.architecture)} levels x {model.architecture[0]} couplings, "
                   f"{model.channels} channels, block_depth {model.block_depth}",
        "predicted_peak_mb": round(plan.predicted_peak_bytes / 2**20, 1),
    }, measured_ours, error_ours)  # fmt: skip
    return Comparison(name, str(Path(dataset_path).resolve()), nnunet_side, ours_side, nnunet.planning_seconds,
                      round(budget / 2**20, 1))  # fmt: skip


def write_synth_datasets(data_dir: Path) -> list[tuple[str, Path]]:
    """The default datasets (``SYNTH_DATASETS``), written with ``iunet3d synth`` (cases already there are kept)."""
    datasets = []
    for name, options in SYNTH_DATASETS.items():
        out = data_dir / name
        _log(f"[{name}] iunet3d synth {' '.join(options)}")
        command = [sys.executable, "-m", "iunet3d", "synth", "--out", str(out), "--no-progress", *options]
        result = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines()
            raise ValueError(f"bench plan: iunet3d synth of {name} failed: {lines[-1] if lines else 'no output'}")
        datasets.append((name, out))
    return datasets


def _check(args: argparse.Namespace) -> None:
    from iunet3d.bench.nnunet_plan import nnunet_version

    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu or cuda, got {args.device!r}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
    for option in ("steps", "processes"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option}: expected a positive integer, got {getattr(args, option)}")
    if args.timeout <= 0:
        raise ValueError(f"--timeout: expected a positive number of seconds, got {args.timeout:g}")
    for path in args.datasets or []:
        if not Path(path).is_dir():
            raise ValueError(f"--datasets: {path} is not a dataset directory")
    nnunet_version()


def _names(paths: list[Path]) -> list[str]:
    names, seen = [], set()
    for path in paths:
        name, n = Path(path).resolve().name or "dataset", 2
        while name in seen:
            name, n = f"{Path(path).resolve().name}_{n}", n + 1
        seen.add(name)
        names.append(name)
    return names


def run(args: argparse.Namespace) -> int:
    """Entry point of ``iunet3d bench plan``."""
    from iunet3d.bench.nnunet_plan import nnunet_version

    _check(args)
    version = nnunet_version()
    with tempfile.TemporaryDirectory(prefix="iunet3d-bench-plan-") as temporary:
        work_dir = Path(args.dir) if args.dir is not None else Path(temporary)
        work_dir.mkdir(parents=True, exist_ok=True)
        if args.datasets:
            datasets = list(zip(_names(args.datasets), map(Path, args.datasets), strict=True))
        else:
            datasets = write_synth_datasets(work_dir / "data")
        start, comparisons = time.perf_counter(), []
        for index, (name, path) in enumerate(datasets):
            comparison = compare_dataset(path, name, index, work_dir / "nnunet", args)
            comparisons.append(comparison)
            if not args.json:
                print(format_table(comparison, version) + "\n", flush=True)
        _log(f"bench plan: {len(comparisons)} datasets in {time.perf_counter() - start:.0f} s")
    if args.json:
        print(json.dumps(json_summary(comparisons, version, args.device, args.steps)))
    return 0


def json_summary(comparisons: list[Comparison], version: str, device: str, steps: int) -> dict:
    """The ``--json`` line: every dataset's entry, and whether all met the target."""
    return {
        "nnunetv2": version,
        "device": device,
        "steps": steps,
        "target_ratio": TARGET_RATIO,
        "datasets": [comparison.to_dict() for comparison in comparisons],
        "target_met": bool(comparisons) and all(comparison.target_met for comparison in comparisons),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datasets", nargs="+", type=Path, metavar="DIR",
                        help="existing iunet3d datasets (default: two synthetic ones, anisotropic 2.5 x 0.8 x 0.8 mm "
                             "and mixed slice thicknesses 1, 2.5, 5 mm)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where both trainings are measured")
    parser.add_argument("--dir", type=Path, help="keep the synthetic data, nnU-Net's raw data and plans here "
                        "(default: a temporary directory, removed at the end)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=2,
                        help="training steps per measurement (default 2: the second holds every gradient and the "
                             "optimizer state)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement (default 3600)")
    parser.add_argument("--processes", type=int, default=2, help="processes for nnU-Net's fingerprint (default 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of the tables")
