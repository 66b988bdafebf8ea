"""``iunet3d train``: one process, or one rank of a torchrun job."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", type=Path, required=required, help="TOML run config (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.steps=200 --set run.dir=runs/a (repeatable)",
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run_train(args: argparse.Namespace) -> int:
    from iunet3d.train.config import load_training_config

    config = load_training_config(args.config, args.overrides)  # fails before any process group exists
    from iunet3d.distributed import setup_distributed, teardown_distributed
    from iunet3d.train.trainer import Trainer

    distributed = setup_distributed(config.train.device)
    try:
        Trainer(config, distributed).fit()
    finally:
        teardown_distributed(distributed)
    return 0
