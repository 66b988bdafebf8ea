"""The probe: a training step in a fresh process, its peak memory, baseline and step time; one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from iunet3d.plan.check import check_config, read_budget
from iunet3d.plan.probe import ProbeError, describe, load_builder, measure_training
from iunet3d.plan.process_memory import TreeSampler
from iunet3d.train.config import load_training_config
from iunet3d.train.demo import DEMO_CONFIG

TINY = [
    "data.dataset=unused",
    "data.num_workers=0",
    "data.batch_size=1",
    "model.channels=4",
    "model.architecture=[1, 1]",
    "model.resampling_stride=[[2, 2, 2]]",
    "model.block_depth=1",
]


def tiny(*extra: str):
    return load_training_config(DEMO_CONFIG, [*TINY, *extra])


def test_tree_sampler_counts_a_child_process():
    child = subprocess.Popen([sys.executable, "-c", "import sys; b = b'x' * (64 * 2**20); sys.stdin.readline()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        with TreeSampler(child.pid, 0.01) as sampler:
            while sampler.peak_bytes < 64 * 2**20 and child.poll() is None:
                sampler.sample()
        assert sampler.peak_bytes >= 64 * 2**20 and sampler.peak_processes == 1 and sampler.samples > 0
    finally:
        child.communicate(b"\n", timeout=30)


def test_builder_must_be_a_function_of_this_repository():
    assert load_builder("iunet3d.plan.probe:describe") is describe
    with pytest.raises(ValueError, match="inside"):
        load_builder("os:system")
    with pytest.raises(ValueError, match="not a function"):
        load_builder("iunet3d.plan.probe:OPTIMIZERS")


def test_describe_names_the_memory_relevant_choices():
    text = describe(tiny("data.patch_size=[8, 16, 16]"), "cuda")
    assert "patch 8x16x16 batch 1 channels 4 architecture [1, 1]" in text and "bf16 on cuda" in text


@pytest.mark.slow
def test_a_probe_measures_peak_above_baseline_and_a_bigger_patch_more():
    small = measure_training(tiny("data.patch_size=[8, 16, 16]"), steps=2, use_dataset=False)
    big = measure_training(tiny("data.patch_size=[16, 64, 64]"), steps=2, use_dataset=False)
    assert 0 < small.baseline_bytes < small.peak_bytes
    assert small.step_seconds > 0 and len(small.step_times) == 2 and small.batches == "random"
    assert small.num_classes == 4 and small.num_parameters > 0
    assert big.peak_bytes > small.peak_bytes + 8 * 2**20  # 32x the voxels


@pytest.mark.slow
def test_a_failing_probe_is_one_line_naming_the_config(tmp_path):
    config = tiny("data.patch_size=[8, 16, 16]", f"data.dataset={tmp_path / 'missing'}")
    with pytest.raises(ProbeError) as error:
        measure_training(config, steps=1)
    message = str(error.value)
    assert "\n" not in message and "patch 8x16x16 batch 1 channels 4" in message and "missing" in message
    result = subprocess.run([sys.executable, "-m", "iunet3d.plan.probe", json.dumps({"config": {"data": 1}})],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 1 and len(result.stdout.strip().splitlines()) == 1
    assert json.loads(result.stdout)["ok"] is False


@pytest.mark.slow
def test_check_config_reports_peak_and_step_time_against_the_budget(tmp_path):
    path = tmp_path / "plan.toml"
    from iunet3d.train.toml_config import to_toml

    path.write_text(to_toml(tiny("data.patch_size=[8, 16, 16]")) + "\n# plan: budget_bytes = 1048576\n")
    assert read_budget(path) == 1048576
    text = check_config(path, budget_bytes=read_budget(path), steps=1, use_dataset=False)
    assert "measured peak" in text and "EXCEEDS the budget" in text and "step time" in text
