"""Builders for trainer tests: a tiny synthetic dataset and the config overrides of a tiny network."""

from __future__ import annotations

from pathlib import Path

from iunet3d.data.synth import SYNTH_CLASS_NAMES, make_phantom
from iunet3d.train.config import TrainingConfig, load_training_config
from iunet3d.train.demo import DEMO_CONFIG
from tests.helpers.data import store_case

REPO = Path(__file__).resolve().parents[2]

#: A network and patches small enough for a CPU step in well under a second.
TINY = [
    "data.patch_size=[8, 32, 32]",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.validation_cases=1",
    "model.channels=8",
    "model.architecture=[1, 1, 1]",
    "model.resampling_stride=[[1, 2, 2], [2, 2, 2]]",
    "model.block_depth=1",
    "train.warmup_steps=2",
    "train.log_every=1",
    "validation.patches_per_case=2",
    "wandb.mode=disabled",
]


def tiny_dataset(path: Path, cases: int = 4, shape=(16, 48, 48), class_names=SYNTH_CLASS_NAMES) -> Path:
    """``cases`` labelled phantoms written straight into a dataset at ``path``."""
    for index in range(cases):
        image, label = make_phantom(shape, (2.5, 0.8, 0.8), seed=(3, index))
        label = label.clip(0, len(class_names) - 1)
        store_case(path, f"case_{index}", image, label, (2.5, 0.8, 0.8), class_names=class_names)
    return path


def overrides(dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.dataset={dataset}", f"run.dir={run_dir}", *TINY, *extra]


def tiny_config(dataset: Path, run_dir: Path, *extra: str) -> TrainingConfig:
    return load_training_config(DEMO_CONFIG, overrides(dataset, run_dir, *extra))


def train_tiny_checkpoint(root: Path):
    """A 3-step run on 3 small phantoms in ``root``: (dataset, ``step-3.pt``, the finished trainer)."""
    from iunet3d.distributed import Distributed
    from iunet3d.train.trainer import Trainer

    dataset = tiny_dataset(root / "data", cases=3, shape=(12, 40, 44))
    config = tiny_config(dataset, root / "run", "train.steps=3", "train.checkpoint_every=3", "validation.every=0")
    trainer = Trainer(config, Distributed())
    trainer.fit()
    return dataset, root / "run" / "checkpoints" / "step-3.pt", trainer
