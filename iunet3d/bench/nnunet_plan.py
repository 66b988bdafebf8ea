"""nnU-Net v2's own 3d_fullres plan of an iunet3d dataset, and its network built from that plan.

``nnunetv2`` is an optional benchmark dependency (``pip install nnunetv2``); it is imported only here and
only when a plan is made or a network built.

1. ``export_raw_dataset``: the dataset in nnU-Net's raw layout (``DatasetXXX_Name/imagesTr/<case>_0000.nii.gz``,
   ``labelsTr/<case>.nii.gz``, ``dataset.json``). The volumes are written in our canonical (z, y, x) axis
   order with the case's physical geometry, so nnU-Net's axes are ours and every case shares one order
   (nnU-Net does not reorient).
2. ``plan_nnunet``: nnU-Net's fingerprint extraction and its default ``ExperimentPlanner`` (default GPU memory
   target), in a child process whose ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` point into the
   working directory (nnU-Net's console output goes to our stderr). No preprocessing: planning reads only
   the fingerprint.
3. ``build_nnunet_network``: the 3d_fullres network, built by nnU-Net's own code from the plans file, deep
   supervision off: (B, 1, D, H, W) -> (B, K, D, H, W) in our axis order (a builder for the probe harness).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from iunet3d.data.dataset import CTDataset, open_dataset

DEFAULT_DATASET_ID = 990
PLANS_NAME = "nnUNetPlans"
CONFIGURATION = "3d_fullres"
FILE_ENDING = ".nii.gz"
_IDENTITY = {"permutation": [0, 1, 2], "flipped": [False, False, False]}


def nnunet_version() -> str:
    """The installed nnunetv2's version; ValueError naming the optional dependency when it is missing."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nnunetv2")
    except PackageNotFoundError:
        raise ValueError("bench plan: nnunetv2 is not installed (pip install nnunetv2)") from None


def nnunet_environment(work_dir: Path | str) -> dict[str, str]:
    """nnU-Net's three folder variables, pointing inside ``work_dir``."""
    work_dir = Path(work_dir).resolve()
    return {
        "nnUNet_raw": str(work_dir / "nnUNet_raw"),
        "nnUNet_preprocessed": str(work_dir / "nnUNet_preprocessed"),
        "nnUNet_results": str(work_dir / "nnUNet_results"),
    }


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net's ``DatasetXXX_Name``; ValueError when the id is outside 1..999."""
    if not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise ValueError(f"nnU-Net dataset id: expected an integer in 1..999, got {dataset_id!r}")
    clean = "".join(c if c.isalnum() else "_" for c in name).strip("_") or "iunet3d"
    return f"Dataset{dataset_id:03d}_{clean}"


def _write_canonical(array: np.ndarray, case, dtype: str, path: Path) -> None:
    from iunet3d.data.image_files import write_volume

    write_volume(np.asarray(array), {"reorientation": _IDENTITY, "geometry": case.info["geometry"]}, dtype, path)


def export_raw_dataset(
    dataset: CTDataset | Path | str, work_dir: Path | str, dataset_id: int = DEFAULT_DATASET_ID, name: str | None = None
) -> Path:
    """Write ``dataset`` in nnU-Net v2's raw layout under ``work_dir/nnUNet_raw``; returns the dataset folder.

    Every case needs a label. Class names become nnU-Net's labels (value 0 is always ``background``).
    Cases already written (same file names) are kept, so a rerun on the same working directory is cheap.
    """
    dataset = open_dataset(dataset)
    if len(dataset) == 0:
        raise ValueError(f"--datasets: {dataset.path} has no cases")
    folder = Path(nnunet_environment(work_dir)["nnUNet_raw"]) / dataset_folder_name(
        dataset_id, name or dataset.path.name
    )
    images, labels = folder / "imagesTr", folder / "labelsTr"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for case in dataset:
        if not case.has_label:
            raise ValueError(f"--datasets: case {case.name} of {dataset.path} has no label; nnU-Net plans need labels")
        image_path, label_path = images / f"{case.name}_0000{FILE_ENDING}", labels / f"{case.name}{FILE_ENDING}"
        if not image_path.exists():
            _write_canonical(case.image_array[...], case, "int16", image_path)
        if not label_path.exists():
            _write_canonical(case.label_array()[...], case, "uint8", label_path)
    class_labels = {"background": 0}
    for value, class_name in enumerate(dataset.class_names[1:], start=1):
        class_labels[class_name if class_name not in class_labels else f"{class_name}_{value}"] = value
    description = {
        "channel_names": {"0": "CT"},
        "labels": class_labels,
        "numTraining": len(dataset),
        "file_ending": FILE_ENDING,
        "name": folder.name.split("_", 1)[1],
        "description": f"exported by iunet3d from {dataset.path.resolve()}",
    }
    (folder / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
    return folder


@dataclass(frozen=True)
class NnunetPlan:
    """nnU-Net's 3d_fullres plan, with sizes in our (z, y, x) axis order."""

    plans_file: str
    patch_size: tuple[int, int, int]  #: z, y, x voxels
    batch_size: int
    spacing: tuple[float, float, float]  #: z, y, x mm (its target spacing)
    median_shape: tuple[int, int, int]  #: median case at that spacing, z, y, x voxels
    transpose_forward: tuple[int, int, int]  #: nnU-Net's axis order (its network sees our axes in this order)
    n_stages: int
    features_per_stage: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]  #: per stage, in nnU-Net's (transposed) axis order
    n_conv_per_stage: tuple[int, ...]
    n_conv_per_stage_decoder: tuple[int, ...]
    network_class: str
    planning_seconds: float = math.nan  #: fingerprint + planning wall time

    @property
    def patch_voxels(self) -> int:
        return math.prod(self.patch_size)

    @property
    def conv_layers(self) -> int:
        """Convolutions on the deepest input-to-output path: encoder and decoder convolutions, one transposed
        convolution per upsampling and the 1x1x1 segmentation head."""
        return sum(self.n_conv_per_stage) + sum(self.n_conv_per_stage_decoder) + (self.n_stages - 1) + 1

    def to_dict(self) -> dict:
        return asdict(self) | {"patch_voxels": self.patch_voxels, "conv_layers": self.conv_layers}


def _to_ours(values: Sequence, transpose_backward: Sequence[int]) -> tuple:
    """A per-axis value in nnU-Net's transposed order -> our (z, y, x) order."""
    return tuple(values[transpose_backward[axis]] for axis in range(3))


def read_plan(
    plans_file: Path | str, configuration: str = CONFIGURATION, planning_seconds: float = math.nan
) -> NnunetPlan:
    """The ``configuration`` of an nnU-Net plans JSON as an ``NnunetPlan``."""
    plans = json.loads(Path(plans_file).read_text())
    configurations = plans.get("configurations", {})
    if configuration not in configurations:
        raise ValueError(
            f"{plans_file}: nnU-Net made no {configuration} configuration (it has {', '.join(configurations)})"
        )
    config = configurations[configuration]
    while "inherits_from" in config:  # cascade entries inherit the rest
        config = configurations[config["inherits_from"]] | {k: v for k, v in config.items() if k != "inherits_from"}
    backward = [int(i) for i in plans["transpose_backward"]]
    kwargs = config["architecture"]["arch_kwargs"]
    return NnunetPlan(
        plans_file=str(Path(plans_file).resolve()),
        patch_size=tuple(int(v) for v in _to_ours(config["patch_size"], backward)),
        batch_size=int(config["batch_size"]),
        spacing=tuple(float(v) for v in _to_ours(config["spacing"], backward)),
        median_shape=tuple(int(round(v)) for v in _to_ours(config["median_image_size_in_voxels"], backward)),
        transpose_forward=tuple(int(i) for i in plans["transpose_forward"]),
        n_stages=int(kwargs["n_stages"]),
        features_per_stage=tuple(int(v) for v in kwargs["features_per_stage"]),
        strides=tuple(tuple(int(s) for s in stride) for stride in kwargs["strides"]),
        n_conv_per_stage=tuple(int(v) for v in kwargs["n_conv_per_stage"]),
        n_conv_per_stage_decoder=tuple(int(v) for v in kwargs["n_conv_per_stage_decoder"]),
        network_class=config["architecture"]["network_class_name"],
        planning_seconds=planning_seconds,
    )


def plan_nnunet(raw_folder: Path | str, num_processes: int = 2) -> NnunetPlan:
    """nnU-Net's fingerprint and default 3d_fullres plan of an exported raw dataset (``export_raw_dataset``).

    Runs in a child process with nnU-Net's folder variables set to the raw folder's working directory
    (``raw_folder/../..``); nnU-Net's console output goes to stderr. Returns the plan with its wall time.
    """
    nnunet_version()
    raw_folder = Path(raw_folder).resolve()
    dataset_id = int(raw_folder.name[len("Dataset") :].split("_", 1)[0])
    env = dict(os.environ, **nnunet_environment(raw_folder.parent.parent), nnUNet_def_n_proc=str(num_processes))
    command = [sys.executable, "-m", "iunet3d.bench.nnunet_plan", "--dataset-id", str(dataset_id),
               "--processes", str(num_processes)]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, env=env, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        sys.stderr.write(result.stderr[-3000:])
        raise ValueError(f"nnU-Net planning of {raw_folder.name} failed: {lines[-1] if lines else 'no output'}")
    plans_file = Path(env["nnUNet_preprocessed"]) / raw_folder.name / f"{PLANS_NAME}.json"
    return read_plan(plans_file, CONFIGURATION, seconds)


def _plan_in_this_process(dataset_id: int, num_processes: int) -> None:
    """Fingerprint + default ExperimentPlanner (nnU-Net's defaults, including its GPU memory target)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
    )

    extract_fingerprint_dataset(dataset_id, num_processes=num_processes, clean=True, verbose=False,
                                show_progress_bar=False)  # fmt: skip
    plan_experiment_dataset(dataset_id)


def build_nnunet_network(
    plans_file: str, configuration: str = CONFIGURATION, num_classes: int | None = None, in_channels: int = 1
):
    """nnU-Net's network for ``configuration`` of ``plans_file``, built by nnU-Net's own code as its trainer
    builds it (``get_network_from_plans`` with its initialisation, deep supervision off): (B, in_channels, D, H,
    W) -> (B, K, D, H, W) with D, H, W in our (z, y, x) order. ``num_classes``: K; default: the labels of the
    dataset.json beside the plans. Only nnU-Net's network code is imported (not its trainer, whose imports
    would add to the measured process's memory)."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plans = json.loads(Path(plans_file).read_text())
    configurations = plans.get("configurations", {})
    if configuration not in configurations:
        raise ValueError(f"{plans_file}: no configuration {configuration!r} (it has {', '.join(configurations)})")
    config = configurations[configuration]
    while "inherits_from" in config:
        config = configurations[config["inherits_from"]] | {k: v for k, v in config.items() if k != "inherits_from"}
    if num_classes is None:
        num_classes = len(json.loads((Path(plans_file).parent / "dataset.json").read_text())["labels"])
    architecture = config["architecture"]
    network = get_network_from_plans(
        architecture["network_class_name"], architecture["arch_kwargs"], architecture["_kw_requires_import"],
        in_channels, num_classes, allow_init=True, deep_supervision=False,
    )  # fmt: skip
    forward = tuple(int(i) for i in plans["transpose_forward"])

    class NnunetNetwork(torch.nn.Module):
        """nnU-Net's network between two spatial permutations (identities when its plan does not transpose)."""

        def __init__(self):
            super().__init__()
            self.network = network
            self.forward_axes = (0, 1, *(2 + a for a in forward))
            self.backward_axes = (0, 1, *(2 + int(i) for i in np.argsort(forward)))

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            if self.forward_axes == (0, 1, 2, 3, 4):
                return self.network(image)
            return self.network(image.permute(self.forward_axes)).permute(self.backward_axes)

    return NnunetNetwork()


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="nnU-Net fingerprint + default plan (a child of plan_nnunet)")
    parser.add_argument("--dataset-id", type=int, required=True)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    _plan_in_this_process(args.dataset_id, args.processes)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
