"""``iunet3d bench plan``: nnU-Net's raw export, its planner and network, the table and JSON line.

The tests marked ``integration`` need our planner's memory model and the probe harness as well.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from iunet3d.bench import plan as bench_plan
from iunet3d.bench.nnunet_plan import (
    dataset_folder_name,
    export_raw_dataset,
    nnunet_environment,
    read_plan,
)
from iunet3d.bench.plan import Comparison, Side, depth_for_layers, format_table, iunet_conv_layers, json_summary
from iunet3d.data import open_dataset
from tests.helpers.train import tiny_dataset

#: A small PlainConvUNet in nnU-Net's plans format, with a transposed axis order (x first).
SMALL_ARCHITECTURE = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 3,
        "features_per_stage": [4, 8, 16],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * 3,
        "strides": [[1, 1, 1], [2, 2, 1], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2],
        "n_conv_per_stage_decoder": [2, 2],
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}


def write_plans(directory: Path, transpose_forward=(2, 0, 1)) -> Path:
    """A plans JSON (and the dataset.json beside it) whose 3d_fullres runs on nnU-Net's axes ``transpose_forward``
    of ours: its patch (8, 16, 32) is (z, y, x) = (16, 32, 8) in our order when transpose_forward is (2, 0, 1)."""
    backward = [int(i) for i in np.argsort(transpose_forward)]
    plans = {
        "dataset_name": "Dataset990_test",
        "plans_name": "nnUNetPlans",
        "transpose_forward": list(transpose_forward),
        "transpose_backward": backward,
        "configurations": {
            "3d_fullres": {
                "batch_size": 3,
                "patch_size": [8, 16, 32],
                "spacing": [3.0, 1.0, 2.0],
                "median_image_size_in_voxels": [10, 20, 40],
                "architecture": SMALL_ARCHITECTURE,
            },
            "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
        },
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2}}))
    path = directory / "nnUNetPlans.json"
    path.write_text(json.dumps(plans))
    return path


# ----- export -------------------------------------------------------------------------------------------


def test_export_writes_nnunet_raw_dataset_with_the_cases_geometry(tmp_path):
    import SimpleITK as sitk

    dataset = open_dataset(tiny_dataset(tmp_path / "data", cases=2, shape=(12, 24, 20)))
    folder = export_raw_dataset(dataset, tmp_path / "work", 991, "tiny set")
    assert folder == Path(nnunet_environment(tmp_path / "work")["nnUNet_raw"]) / "Dataset991_tiny_set"
    description = json.loads((folder / "dataset.json").read_text())
    assert description["channel_names"] == {"0": "CT"}
    assert description["labels"] == {name if i else "background": i for i, name in enumerate(dataset.class_names)}
    assert description["numTraining"] == 2 and description["file_ending"] == ".nii.gz"
    for case in dataset:
        image = sitk.ReadImage(str(folder / "imagesTr" / f"{case.name}_0000.nii.gz"))
        label = sitk.ReadImage(str(folder / "labelsTr" / f"{case.name}.nii.gz"))
        for volume, stored in ((image, case.image_array[...]), (label, case.label_array()[...])):
            np.testing.assert_allclose(volume.GetSpacing()[::-1], case.spacing, rtol=1e-6)  # ITK x, y, z
            np.testing.assert_array_equal(sitk.GetArrayFromImage(volume), stored)
        np.testing.assert_allclose(image.GetOrigin(), case.geometry.origin, atol=1e-4)
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == ["case_0_0000.nii.gz", "case_1_0000.nii.gz"]


def test_nnunet_environment_and_folder_names(tmp_path):
    env = nnunet_environment(tmp_path)
    assert env == {
        key: str(tmp_path.resolve() / key) for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    }
    assert dataset_folder_name(7, "my-data") == "Dataset007_my_data"
    with pytest.raises(ValueError, match="nnU-Net dataset id"):
        dataset_folder_name(1000, "x")


# ----- plans and network --------------------------------------------------------------------------------


def test_read_plan_maps_nnunets_axes_to_ours(tmp_path):
    plan = read_plan(write_plans(tmp_path))
    assert plan.patch_size == (16, 32, 8) and plan.patch_voxels == 8 * 16 * 32
    assert plan.spacing == (1.0, 2.0, 3.0) and plan.median_shape == (20, 40, 10)
    assert plan.batch_size == 3 and plan.n_stages == 3
    assert plan.conv_layers == 6 + 4 + 2 + 1  # encoder, decoder, two transposed convolutions, the head
    assert read_plan(write_plans(tmp_path), "3d_cascade_fullres").patch_size == (16, 32, 8)
    with pytest.raises(ValueError, match="no 3d_lowres configuration"):
        read_plan(write_plans(tmp_path), "3d_lowres")


@pytest.mark.slow
@pytest.mark.parametrize("transpose_forward", [(0, 1, 2), (2, 0, 1)])
def test_builder_maps_an_image_to_k_channels_in_our_axis_order(tmp_path, transpose_forward):
    import torch

    from iunet3d.bench.nnunet_plan import build_nnunet_network

    plans_file = write_plans(tmp_path, transpose_forward)
    network = build_nnunet_network(str(plans_file))  # K from dataset.json: 3
    patch = read_plan(plans_file).patch_size
    output = network(torch.randn(2, 1, *patch))
    assert output.shape == (2, 3, *patch)
    output.float().square().mean().backward()
    assert build_nnunet_network(str(plans_file), num_classes=5)(torch.randn(1, 1, *patch)).shape[1] == 5


@pytest.mark.slow
def test_nnunets_planner_plans_a_tiny_exported_dataset(tmp_path):
    from iunet3d.bench.nnunet_plan import plan_nnunet

    dataset = open_dataset(tiny_dataset(tmp_path / "data", cases=2, shape=(16, 48, 48)))
    plan = plan_nnunet(export_raw_dataset(dataset, tmp_path / "work", 992, "tiny"), num_processes=1)
    assert Path(plan.plans_file).is_file() and plan.planning_seconds > 0
    assert plan.batch_size >= 2 and all(0 < p <= m for p, m in zip(plan.patch_size, (16, 48, 48), strict=True))
    np.testing.assert_allclose(plan.spacing, (2.5, 0.8, 0.8), rtol=1e-5)
    assert plan.median_shape == (16, 48, 48) and plan.conv_layers > 0
    assert plan.network_class.endswith("PlainConvUNet")


# ----- layers, table and JSON ---------------------------------------------------------------------------


def test_layer_counts():
    assert iunet_conv_layers((2, 2, 2, 2), 2) == 1 + 2 * 8 * 2 + 6 + 1
    assert iunet_conv_layers((1,), 1) == 4
    assert depth_for_layers(28, 4, 2) == 2  # nnU-Net's six stages vs four levels of block depth 2
    for layers in range(1, 80):
        for levels in (1, 3, 5):
            depth = depth_for_layers(layers, levels, 2)
            assert iunet_conv_layers((depth,) * levels, 2) >= layers
            assert depth == 1 or iunet_conv_layers((depth - 1,) * levels, 2) < layers


def fixed_comparison(ours_peak: float = 9800.0) -> Comparison:
    nnunet = Side((56, 192, 192), 2, (2.5, 0.8, 0.8), 28, "PlainConvUNet 6 stages, 32-320 features", "sgd (nnU-Net's)",
                  10000.0, 900.0, 120.5, 30_705_108)  # fmt: skip
    ours = Side((96, 384, 384), 2, (2.5, 0.8, 0.8), 40, "iUNet 4 levels x 2 couplings, 16 channels, block_depth 2",
                "adamw", ours_peak, 700.0, 300.25, 2_000_000, predicted_peak_mb=9500.0)  # fmt: skip
    return Comparison("anisotropic", "/data/anisotropic", nnunet, ours, 48.3, 10000.0)


def test_table_and_json_of_fixed_results():
    comparison = fixed_comparison()
    assert comparison.patch_ratio == pytest.approx(96 * 384 * 384 / (56 * 192 * 192))
    assert comparison.target_met
    table = format_table(comparison, "2.8.1")
    assert "| patch (z, y, x voxels) | 56 x 192 x 192 | 96 x 384 x 384 |" in table
    assert "| patch voxels | 2,064,384 | 14,155,776 |" in table
    assert "| batch | 2 | 2 |" in table and "| layers (convolutions, deepest path) | 28 | 40 |" in table
    assert "| measured peak MB | 10,000 | 9,800 |" in table
    assert "6.86x (target >= 4x)" in table and "target met" in table
    line = json.dumps(json_summary([comparison], "2.8.1", "cpu", 2))
    assert "\n" not in line
    summary = json.loads(line)
    assert summary["nnunetv2"] == "2.8.1" and summary["target_met"] is True
    entry = summary["datasets"][0]
    assert {k: entry[k] for k in ("patch_voxels_ours", "patch_voxels_nnunet", "batch_ours", "batch_nnunet",
                                  "peak_mb_ours", "peak_mb_nnunet")} == {
        "patch_voxels_ours": 14_155_776, "patch_voxels_nnunet": 2_064_384, "batch_ours": 2, "batch_nnunet": 2,
        "peak_mb_ours": 9800.0, "peak_mb_nnunet": 10000.0}  # fmt: skip
    assert entry["layers_ours"] == 40 and entry["layers_nnunet"] == 28 and entry["patch_ours"] == [96, 384, 384]


def test_target_not_met_when_our_peak_exceeds_nnunets_or_a_measurement_failed():
    over = fixed_comparison(ours_peak=11000.0)
    assert not over.target_met and "target NOT met" in format_table(over, "2.8.1")
    failed = fixed_comparison(ours_peak=None)
    failed.ours.error = "probe patch 96x384x384: killed by signal 9 (out of memory?)"
    table = format_table(failed, "2.8.1")
    assert not failed.target_met and "| measured peak MB | 10,000 | failed |" in table
    assert "iunet3d measurement failed: probe patch" in table
    assert json_summary([failed], "2.8.1", "cpu", 2)["target_met"] is False


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_plan.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--steps", "0"), "--steps"),
        (("--processes", "0"), "--processes"),
        (("--timeout", "0"), "--timeout"),
        (("--device", "tpu"), "--device"),
        (("--datasets", "/no/such/dataset"), "--datasets"),
    ],
)
def test_bad_options_fail_in_one_line_naming_the_option(argv, message):
    with pytest.raises(ValueError, match=message) as error:
        bench_plan.run(parse(*argv))
    assert "\n" not in str(error.value)


# ----- integration: nnU-Net's network in the probe harness, and the whole comparison -------------------


@pytest.mark.slow
def test_harness_measures_nnunets_network_as_a_builder(tmp_path):
    from dataclasses import replace

    from iunet3d.plan import probe
    from iunet3d.train.config import DataConfig, TrainingConfig

    plans_file = write_plans(tmp_path, (2, 0, 1))
    config = TrainingConfig(data=DataConfig(dataset="<random>", patch_size=read_plan(plans_file).patch_size,
                                            batch_size=2, num_workers=0, classes=("background", "a", "b")))  # fmt: skip
    config = replace(config, train=replace(config.train, device="cpu"))
    builder = {"builder": bench_plan.BUILDER, "kwargs": {"plans_file": str(plans_file)}}
    measurement = probe.measure_training(config, "cpu", steps=2, builder=builder, optimizer="sgd", use_dataset=False)
    assert measurement.peak_bytes > 0 and measurement.num_classes == 3 and measurement.num_parameters > 0
