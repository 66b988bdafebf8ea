"""Loss, Dice metric, LR schedule, checkpoints, validation cadence and the segmentation network, each on its own."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from iunet3d.data import CTNormalization, open_dataset
from iunet3d.data.staging import TEMPORARY_PREFIX
from iunet3d.distributed import Distributed
from iunet3d.infer.checkpoint_file import UnsafeCheckpointError
from iunet3d.infer.dice import confusion_counts, dice_scores, mean_dice
from iunet3d.models.segmentation import SegmentationIUNet
from iunet3d.train.checkpoint import CheckpointManager, load_checkpoint
from iunet3d.train.config import ValidationConfig
from iunet3d.train.loss import DiceCELoss
from iunet3d.train.patch_validation import PatchValidator
from iunet3d.train.schedule import lr_factor
from iunet3d.train.validator import Validator
from iunet3d.train.volume_validation import VolumeValidator
from tests.helpers.train import tiny_dataset
from tests.helpers.unsafe_pickle import write_code_checkpoint

CLASSES = ["background", "liver", "kidney", "lesion"]


def random_batch(batch=4, classes=4, shape=(4, 8, 8), seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, *shape, generator=generator, dtype=torch.float64)
    target = torch.randint(0, classes, (batch, *shape), generator=generator)
    return logits, target


def test_the_loss_of_a_batch_is_the_mean_of_its_halves_so_ddp_averaging_is_exact():
    logits, target = random_batch()
    loss = DiceCELoss()
    whole = loss(logits, target)
    halves = (loss(logits[:2], target[:2]) + loss(logits[2:], target[2:])) / 2
    assert torch.allclose(whole, halves, rtol=1e-12)


def test_a_confident_correct_prediction_has_a_loss_near_zero_and_a_wrong_one_a_large_loss():
    _, target = random_batch()
    right = torch.nn.functional.one_hot(target, 4).permute(0, 4, 1, 2, 3).double() * 40
    wrong = torch.nn.functional.one_hot((target + 1) % 4, 4).permute(0, 4, 1, 2, 3).double() * 40
    loss = DiceCELoss()
    assert loss(right, target) < 1e-3
    assert loss(wrong, target) > 30


def test_the_weights_combine_the_terms_and_the_ce_term_is_torchs():
    logits, target = random_batch()
    dice_only, ce_only = DiceCELoss(1, 0)(logits, target), DiceCELoss(0, 1)(logits, target)
    assert torch.allclose(DiceCELoss(2, 3)(logits, target), 2 * dice_only + 3 * ce_only)
    assert torch.allclose(ce_only, torch.nn.functional.cross_entropy(logits, target))


def test_the_terms_are_the_unweighted_parts_of_the_loss():
    logits, target = random_batch()
    terms = DiceCELoss(2, 3).terms(logits, target)
    assert torch.allclose(terms["dice"], DiceCELoss(1, 0)(logits, target))
    assert torch.allclose(terms["ce"], DiceCELoss(0, 1)(logits, target))
    assert DiceCELoss(0, 1).terms(logits, target)["dice"] == 0  # a zero weight skips its term


def test_the_dice_term_covers_foreground_classes_only():
    target = torch.zeros(2, 4, 8, 8, dtype=torch.long)
    background = torch.zeros(2, 4, 4, 8, 8, dtype=torch.float64)
    background[:, 0] = 40  # all background, predicted as such: no foreground to get wrong
    assert DiceCELoss(1, 0)(background, target) < 1e-6
    target[:, :, :4] = 1  # half the voxels are liver, still predicted background
    assert DiceCELoss(1, 0)(background, target) > 0.3


def test_confusion_counts_match_a_direct_count_and_add_up_over_patches():
    rng = np.random.default_rng(0)
    prediction, target = rng.integers(0, 4, (2, 6, 7, 8)), rng.integers(0, 4, (2, 6, 7, 8))
    counts = confusion_counts(torch.from_numpy(prediction), torch.from_numpy(target), 4)
    for value in range(4):
        assert counts[value, 0] == np.sum((prediction == value) & (target == value))
        assert counts[value, 1] == np.sum((prediction == value) & (target != value))
        assert counts[value, 2] == np.sum((prediction != value) & (target == value))
    halves = sum(
        confusion_counts(torch.from_numpy(p), torch.from_numpy(t), 4) for p, t in zip(prediction, target, strict=True)
    )
    assert torch.equal(counts, halves)
    dice = dice_scores(counts, CLASSES)
    assert list(dice) == CLASSES[1:]
    liver = (2 * counts[1, 0] / (2 * counts[1, 0] + counts[1, 1] + counts[1, 2])).item()
    assert dice["liver"] == pytest.approx(liver)


def test_a_class_absent_from_labels_and_prediction_has_no_dice_and_does_not_enter_the_mean():
    target = torch.tensor([0, 1, 1, 2])
    prediction = torch.tensor([0, 1, 2, 2])
    dice = dice_scores(confusion_counts(prediction, target, 4), CLASSES)
    assert dice["liver"] == pytest.approx(2 / 3) and dice["kidney"] == pytest.approx(2 / 3)
    assert math.isnan(dice["lesion"])
    assert mean_dice(dice) == pytest.approx(2 / 3)
    assert confusion_counts(target, target, 4)[:, 1:].sum() == 0


@pytest.mark.parametrize("schedule", ["cosine", "poly"])
def test_the_schedule_warms_up_linearly_then_decays_to_the_floor(schedule):
    factors = [lr_factor(s, steps=100, warmup_steps=10, schedule=schedule, min_lr_ratio=0.01) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:9], factors[1:10], strict=True))
    assert all(a >= b for a, b in zip(factors[10:-1], factors[11:], strict=True))
    assert factors[100] == pytest.approx(0.01)
    assert lr_factor(5, steps=100, warmup_steps=0, schedule="constant", min_lr_ratio=0.01) == 1.0


def test_checkpoints_are_kept_newest_k_and_the_latest_pointer_follows(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep=2)
    for step in (1, 2, 3):
        manager.save(step, {"step": step, "model": {"w": torch.full((2,), float(step))}})
    assert manager.steps() == [2, 3]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-3.pt"
    path, state = manager.load_latest()
    assert path.name == "step-3.pt" and state["step"] == 3 and torch.equal(state["model"]["w"], torch.full((2,), 3.0))
    assert load_checkpoint(path)["step"] == 3


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(1, {"step": 1, "model": {}})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        manager.save(2, {"step": 2, "model": {}, "bad": Unpicklable()})
    assert manager.steps() == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1.pt"]
    assert manager.load_latest()[1]["step"] == 1


def test_a_temporary_file_left_by_a_killed_save_is_removed_by_the_next_save(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    leftover = tmp_path / f"{TEMPORARY_PREFIX}12345-step-1.pt"
    leftover.write_bytes(b"half a checkpoint")
    assert manager.steps() == []  # never read as a checkpoint
    manager.save(1, {"step": 1, "model": {}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1.pt"]


@pytest.mark.parametrize(("every", "due"), [(3, [3, 6, 9, 10]), (0, [10]), (5, [5, 10])])
def test_validation_is_due_every_n_steps_and_at_the_last(tmp_path, every, due):
    dataset = open_dataset(tiny_dataset(tmp_path / "data", cases=2, shape=(8, 24, 24)))
    config = ValidationConfig(every=every, mode="patch", patches_per_case=1)
    for kind in (PatchValidator, VolumeValidator):
        validator = kind(dataset, dataset.case_names, (8, 16, 16), config, Distributed(), CTNormalization.window())
        assert [step for step in range(1, 11) if validator.should_validate(step, last_step=10)] == due
        assert validator.autocast_dtype is None and isinstance(validator, Validator)


def test_a_corrupted_newest_checkpoint_is_skipped_with_a_warning(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(1, {"step": 1, "model": {}})
    manager.save(2, {"step": 2, "model": {}})
    (tmp_path / "step-2.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="step-2.pt: unreadable checkpoint skipped"):
        path, state = manager.load_latest()
    assert path.name == "step-1.pt" and state["step"] == 1
    assert CheckpointManager(tmp_path / "empty").load_latest() is None


def test_a_checkpoint_holding_code_is_never_skipped_and_unreadable_checkpoints_alone_are_an_error(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(1, {"step": 1, "model": {}})
    (tmp_path / "step-2.pt").write_bytes(b"not a checkpoint")
    write_code_checkpoint(tmp_path / "step-3.pt", tmp_path / "marker")
    with pytest.raises(UnsafeCheckpointError, match=r"step-3\.pt: refuses to unpickle code/objects"):
        manager.load_latest()  # not skipped for step 1: a file holding code must be looked at
    assert not (tmp_path / "marker").exists()
    (tmp_path / "step-3.pt").unlink()
    (tmp_path / "step-1.pt").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(ValueError) as unreadable:
        manager.load_latest()
    assert str(unreadable.value).startswith(
        f"{tmp_path}: no checkpoint is readable: step-2.pt (not a readable checkpoint (Unsupported operand 110)); "
        "step-1.pt (not a readable checkpoint (the file ends early: empty or truncated)); "
    )


def test_the_segmentation_network_maps_images_to_class_logits_and_trains_every_parameter():
    network = SegmentationIUNet(1, 4, channels=8, architecture=(1, 1, 1), resampling_stride=[[1, 2, 2], [2, 2, 2]])
    assert network.downsampling_factors == (2, 4, 4)
    image = torch.randn(2, 1, 8, 16, 16)
    logits = network(image)
    assert logits.shape == (2, 4, 8, 16, 16)
    DiceCELoss()(logits, torch.randint(0, 4, (2, 8, 16, 16))).backward()
    missing = [name for name, p in network.named_parameters() if p.grad is None]
    assert not missing
    assert image.abs().sum() > 0  # the caller's input is intact after the reversible backward
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 1, D, H, W\)"):
        network(torch.randn(2, 3, 8, 16, 16))
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationIUNet(1, 1)


def test_a_class_absent_from_a_patch_gets_no_dice_term_but_its_false_positives_cost_cross_entropy():
    target = torch.zeros(1, 4, 8, 8, dtype=torch.long)
    target[:, :2] = 1  # liver present, kidney and lesion absent
    logits = torch.zeros(1, 4, 4, 8, 8, dtype=torch.float64)
    logits[:, 1, :2] = 40  # liver exactly right
    logits[:, 0, 2:] = 40
    false_positive = logits.clone()
    false_positive[:, 3, 3, 0, 0] = 80  # one background voxel predicted as lesion
    dice, cross_entropy = DiceCELoss(1, 0), DiceCELoss(0, 1)
    assert dice(logits, target) < 1e-6 and dice(false_positive, target) < 1e-6
    assert cross_entropy(false_positive, target) > cross_entropy(logits, target) + 0.1
    false_positive[:, 1, 0, 0, 0] = -40  # a liver voxel missed: the present class's Dice term sees it
    assert dice(false_positive, target) == pytest.approx(1 - 2 * 127 / (2 * 127 + 1), rel=1e-3)
