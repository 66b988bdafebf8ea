"""The planner: strides follow the spacing, patches fit the downsampling and the cases, the budget is used and
respected, too small a budget is refused naming the smallest that works, and the written TOML trains."""

from __future__ import annotations

import math

import numpy as np
import pytest

from iunet3d.distributed import Distributed
from iunet3d.plan.check import read_budget, read_predicted
from iunet3d.plan.config_file import plan_toml
from iunet3d.plan.planner import BUDGET_FRACTION, MIN_BATCH, plan_training
from iunet3d.plan.topology import MIN_BOTTLENECK, level_strides, patch_topology, total_stride
from iunet3d.train.config import load_training_config
from iunet3d.train.toml_config import to_dict
from iunet3d.train.trainer import Trainer
from tests.helpers.data import random_ct, store_case

GB = 2**30


def activation_model(config) -> float:
    """Peak bytes of a made-up but iUNet-shaped memory model: a constant plus activations, flat in depth."""
    voxels = math.prod(config.data.patch_size)
    return 0.4 * GB + 4 * 24 * config.data.batch_size * voxels * config.model.channels


@pytest.fixture(scope="module")
def thick_slices(tmp_path_factory):
    """Two small cases at 5 x 0.7 x 0.7 mm (too small for a real plan's patch, fine for its rules)."""
    path = tmp_path_factory.mktemp("plan") / "thick"
    for index, shape in enumerate([(24, 96, 96), (28, 100, 92)]):
        image, label = random_ct(shape, seed=index)
        store_case(path, f"case_{index}", image, label, (5.0, 0.7, 0.7))
    return path


def test_thick_slices_are_not_pooled_along_z_at_the_first_levels_and_isotropic_data_everywhere():
    thick = level_strides((5.0, 0.7, 0.7), (32, 256, 256))
    assert thick[:2] == [(1, 2, 2), (1, 2, 2)]  # in-plane 0.7 -> 1.4 -> 2.8 mm: z (5 mm) is then within 2x
    assert thick[2] == (2, 2, 2)
    assert level_strides((1.0, 1.0, 1.0), (128, 128, 128)) == [(2, 2, 2)] * 5
    for spacing, patch in (((5.0, 0.7, 0.7), (32, 256, 256)), ((1.0, 1.0, 1.0), (128, 128, 128))):
        bottleneck = [p // f for p, f in zip(patch, total_stride(level_strides(spacing, patch)), strict=True)]
        assert min(bottleneck) >= MIN_BOTTLENECK


@pytest.mark.parametrize("voxels", [10, 5e3, 1e5, 2e6, 5e7])
@pytest.mark.parametrize("spacing", [(5.0, 0.7, 0.7), (2.5, 0.8, 0.8), (1.0, 1.0, 1.0)])
def test_patches_are_divisible_by_their_downsampling_and_within_the_median_shape(spacing, voxels):
    shape = (60, 400, 400)
    patch, strides = patch_topology(spacing, shape, voxels)
    factor = total_stride(strides)
    assert all(p % f == 0 for p, f in zip(patch, factor, strict=True))
    assert all(p <= max(n, f) for p, n, f in zip(patch, shape, factor, strict=True))
    if voxels >= 5e3:  # below that, every axis keeps at least one voxel whatever the budget
        assert math.prod(patch) <= voxels
    if voxels >= 1e5:  # large enough to reach the shape's aspect: equal millimetres per axis, unless clipped
        extents = [p * s for p, s, n in zip(patch, spacing, shape, strict=True) if p < n - 16]
        assert len(extents) < 2 or max(extents) <= 2.5 * min(extents)


def test_the_plan_uses_the_budget_and_respects_it_and_a_bigger_budget_gets_a_bigger_patch(thick_slices):
    small = plan_training(thick_slices, 1.0 * GB, model=activation_model)
    large = plan_training(thick_slices, 1.4 * GB, model=activation_model)
    for plan, budget in ((small, 1.0 * GB), (large, 1.4 * GB)):
        assert plan.batch_size >= MIN_BATCH
        assert plan.predicted_peak_bytes <= BUDGET_FRACTION * budget
        assert plan.predicted_peak_bytes == activation_model(plan.config)
        assert plan.config.data.target_spacing == (5.0, 0.7, 0.7)
        assert all(p <= n for p, n in zip(plan.patch_size, plan.median_shape, strict=True))
    assert math.prod(large.patch_size) * large.batch_size > math.prod(small.patch_size) * small.batch_size
    assert small.predicted_peak_bytes >= 0.8 * GB  # most of the budget is used
    assert small.config.model.resampling_stride[0] == (1, 2, 2)


def test_depth_changes_the_architecture_not_the_patch_under_a_depth_free_model(thick_slices):
    shallow = plan_training(thick_slices, 1.0 * GB, model=activation_model, depth=1)
    deep = plan_training(thick_slices, 1.0 * GB, model=activation_model, depth=8)
    assert shallow.patch_size == deep.patch_size and set(deep.architecture) == {8}


def test_a_tiny_budget_is_refused_naming_the_smallest_budget_that_works(thick_slices):
    with pytest.raises(ValueError, match=r"--memory 0\.10 GB is below .* give at least 0\.4\d GB") as refused:
        plan_training(thick_slices, 0.1 * GB, model=activation_model)
    needed = float(str(refused.value).rsplit("at least ", 1)[1].split(" GB")[0]) * GB
    plan_training(thick_slices, needed * 1.01, model=activation_model)  # that much works


@pytest.mark.slow
def test_the_written_toml_loads_equal_to_the_plan_records_its_budget_and_trains_two_steps(thick_slices, tmp_path):
    plan = plan_training(thick_slices, 0.5 * GB, model=activation_model)  # a small patch: a quick CPU step
    text = plan_toml(plan, "iunet3d plan thick --memory 0.5")
    path = tmp_path / "plan.toml"
    path.write_text(text)
    assert read_budget(path) == int(0.5 * GB) and read_predicted(path) == round(plan.predicted_peak_bytes)
    for key in ("patch_size", "batch_size", "target_spacing"):  # every choice carries its reason
        line = next(line for line in text.splitlines() if line.startswith(f"{key} ="))  # the [data] one
        assert "# " in line
    loaded = load_training_config(path)
    assert to_dict(loaded) == to_dict(plan.config)
    # trains as it is (only where the run goes, how long and where W&B logs are set here)
    overrides = [f"run.dir={tmp_path / 'run'}", "train.steps=2", "wandb.mode=disabled", "validation.every=0",
                 "data.validation_cases=0", "data.num_workers=0"]  # fmt: skip
    trainer = Trainer(load_training_config(path, overrides), Distributed())
    summary = trainer.fit()
    assert summary["step"] == 2 and summary["completed"]
    assert all(np.isfinite(p.detach().numpy()).all() for p in trainer.network.parameters())
