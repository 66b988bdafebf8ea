"""The iUNet's reconstruction error, and the trainer's health check that warns when it grows."""

import sys
import warnings

import pytest
import torch
from torch import nn

from iunet3d import iUNet
from iunet3d.distributed import Distributed
from iunet3d.models.segmentation import SegmentationIUNet
from iunet3d.train.health import InvertibilityMonitor
from iunet3d.train.trainer import Trainer
from tests.helpers.tensors import randomise_parameters
from tests.helpers.train import tiny_config, tiny_dataset
from tests.helpers.wandb_records import read_offline_history


class _Noisy(nn.Module):
    """A coupling function made non-deterministic: every evaluation adds fresh noise, so the inverse no
    longer undoes the forward (as a block that has become numerically non-invertible)."""

    def __init__(self, function: nn.Module, scale: float = 0.1):
        super().__init__()
        self.function, self.scale = function, scale

    def forward(self, x):
        y = self.function(x)
        return y + self.scale * torch.randn_like(y)


def test_reconstruction_error_of_a_healthy_network_is_at_float_precision_and_changes_nothing():
    with pytest.warns(UserWarning, match="norm='batch'"):
        model = iUNet(4, [2, 2, 1], dim=3, resampling_stride=[(1, 2, 2), 2], module_kwargs=dict(norm="batch"))
    randomise_parameters(model, scale=0.2)
    x = torch.randn(2, 4, 4, 8, 8)
    buffers = [b.clone() for b in model.buffers()]
    error = model.reconstruction_error(x)
    assert 0 < error.total < 1e-5 and len(error.levels) == 3 and all(0 < e < 1e-5 for e in error.levels)
    assert float(error) == error.total
    per_level = {f"health/reconstruction_error/level_{i}": e for i, e in enumerate(error.levels)}
    assert error.metrics() == {"health/reconstruction_error": error.total, **per_level}
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers, strict=True))  # BatchNorm untouched
    assert model.double().reconstruction_error(x.double()).total < 1e-13


def test_reconstruction_error_finds_a_non_invertible_block_and_its_level():
    model = iUNet(4, [1, 1, 1], dim=2)
    randomise_parameters(model, scale=0.2)
    model.decoder_levels[1][1].function = _Noisy(model.decoder_levels[1][1].function)
    error = model.reconstruction_error(torch.randn(2, 4, 8, 8))
    assert error.total > 1e-2
    # level 0's skip is recovered before decoder level 1 is inverted; the codes below it are not
    assert error.levels[0] < 1e-5 and error.levels[1] > 1e-2 and error.levels[2] > 1e-2


def _segmentation_network(noisy: bool) -> SegmentationIUNet:
    torch.manual_seed(0)
    network = SegmentationIUNet(1, 3, channels=8, architecture=(1, 1), resampling_stride=[[1, 2, 2]])
    randomise_parameters(network, scale=0.2)
    if noisy:
        coupling = network.iunet.encoder_levels[0][0]
        coupling.function = _Noisy(coupling.function)
    return network


def test_the_monitor_warns_once_naming_the_value_and_what_to_do():
    monitor = InvertibilityMonitor(every=0, threshold=1e-3, distributed=Distributed(), autocast=torch.no_grad)
    image = torch.randn(2, 1, 4, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        healthy = monitor.check(_segmentation_network(noisy=False), image, step=5)
    assert healthy["health/reconstruction_error"] < 1e-5 and not monitor.warned
    noisy = _segmentation_network(noisy=True)
    expected = r"health/reconstruction_error \S+ at step 7 exceeds train.health_threshold"
    with pytest.warns(UserWarning, match=expected) as caught:
        metrics = monitor.check(noisy, image, step=7)
    assert metrics["health/reconstruction_error"] > 1e-3 and "reversible_engine = 'none'" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per run
        assert monitor.check(noisy, image, step=8)["health/reconstruction_error"] > 1e-3


def test_when_the_monitor_is_due():
    monitor = InvertibilityMonitor(every=0, threshold=1e-3, distributed=Distributed(), autocast=torch.no_grad)
    assert monitor.due(10, validating=True) and not monitor.due(10, validating=False)
    monitor.every = 4
    assert monitor.due(8, validating=False) and not monitor.due(10, validating=True)
    monitor.every = -1
    assert not monitor.due(8, validating=True)


def test_the_trainer_checks_health_and_reports_it(tmp_path):
    dataset = tiny_dataset(tmp_path / "data", cases=3, shape=(12, 40, 44))
    config = tiny_config(dataset, tmp_path / "run", "train.steps=2", "train.health_every=1", "validation.every=0",
                         "validation.mode=patch")  # fmt: skip
    trainer = Trainer(config, Distributed())
    checks = []
    original = trainer.health.check
    trainer.health.check = lambda network, image, step: (
        checks.append((step, tuple(image.shape))) or original(network, image, step)
    )
    summary = trainer.fit()
    assert checks == [(1, (2, 1, 8, 32, 32)), (2, (2, 1, 8, 32, 32))]
    assert 0 < summary["health/reconstruction_error"] < 1e-5
    assert {f"health/reconstruction_error/level_{i}" for i in range(3)} <= set(summary)


@pytest.mark.slow
def test_the_dashboard_gets_loss_terms_gradient_norm_before_clipping_and_health_at_their_steps(tmp_path):
    dataset = tiny_dataset(tmp_path / "data", cases=3, shape=(12, 40, 44))
    config = tiny_config(dataset, tmp_path / "run", "train.steps=4", "train.log_every=2", "train.health_every=2",
                         "train.clip_grad_norm=1e-4", "validation.every=0", "validation.mode=patch",
                         "wandb.mode=offline")  # fmt: skip
    trainer = Trainer(config, Distributed())
    trainer.fit()
    sys.modules["wandb"].teardown()
    history = read_offline_history(tmp_path / "run")
    logged = {row["_step"]: row for row in history if "train/loss" in row}
    assert sorted(logged) == [2, 4]
    for row in logged.values():
        dice, ce = config.loss.dice_weight * row["train/loss_dice"], config.loss.ce_weight * row["train/loss_ce"]
        assert row["train/loss"] == pytest.approx(dice + ce)
        assert row["train/grad_norm_max"] >= row["train/grad_norm"] > 100 * 1e-4  # measured before clipping
        assert row["train/lr"] > 0 and row["perf/patches_per_s"] > 0 and row["perf/peak_memory_mb"] > 0
    health = [row["_step"] for row in history if "health/reconstruction_error" in row]
    assert health == [2, 4] and all(0 < row["health/reconstruction_error"] < 1e-5 for row in history if
                                    "health/reconstruction_error" in row)  # fmt: skip
