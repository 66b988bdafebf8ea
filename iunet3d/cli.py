"""The ``iunet3d`` command line (also ``python -m iunet3d``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iunet3d", description="Memory-efficient training of deep invertible 3D U-Nets on CT volumes."
    )
    from iunet3d import __version__

    parser.add_argument("--version", action="version", version=f"iunet3d {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from iunet3d.data import commands as data_commands
    from iunet3d.infer import commands as infer_commands
    from iunet3d.plan import commands as plan_commands
    from iunet3d.train import commands as train_commands
    from iunet3d.train import demo

    for name, help_text, add_arguments, handler in (
        ("convert", "convert NIfTI/NRRD/MHA/DICOM CT (and labels) into a Zarr dataset",
         data_commands.add_convert_arguments, data_commands.run_convert),
        ("synth", "write CT-like synthetic cases with labels (the built-in dataset)",
         data_commands.add_synth_arguments, data_commands.run_synth),
        ("export", "write a stored case (or its label) back to NIfTI/NRRD/MHA with its original geometry",
         data_commands.add_export_arguments, data_commands.run_export),
        ("info", "summarise a dataset: classes, cases, spacing and intensity statistics",
         data_commands.add_info_arguments, data_commands.run_info),
        ("train", "train a segmentation iUNet from a TOML config: one process as it is, several with "
         "`torchrun --nproc-per-node=N -m iunet3d train --config FILE`",
         train_commands.add_train_arguments, train_commands.run_train),
        ("demo", "the main job: synthetic CT, 2-process torchrun training on CPU, summary",
         demo.add_demo_arguments, demo.run_demo),
        ("predict", "segment whole volumes with a trained checkpoint (Gaussian-weighted sliding window)",
         infer_commands.add_predict_arguments, infer_commands.run_predict),
        ("plan", "write a training config chosen for a dataset and a memory budget (measured memory model); "
         "--check FILE measures a config's peak memory and step time",
         plan_commands.add_plan_arguments, plan_commands.run_plan),
    ):  # fmt: skip
        _add_command(commands, name, help_text, add_arguments, handler)

    bench = commands.add_parser("bench", help="benchmarks that print side-by-side tables")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    from iunet3d.bench import data, memory, plan, predict, read

    for name, help_text, module in (
        ("memory", "conventional vs reversible peak training memory and step time over depth", memory),
        ("read", "random region reads from a CT volume in Zarr: our chunking and codec vs zarr's defaults", read),
        ("data", "training patches/s and peak memory: our PatchStream from Zarr vs TorchIO's Queue from .nii.gz",
         data),
        ("predict", "whole-volume prediction: voxels/s and peak memory, accumulator in memory vs streamed through Zarr",
         predict),
        ("plan", "nnU-Net v2's 3d_fullres plan vs ours at the same measured training memory", plan),
    ):  # fmt: skip
        _add_command(benchmarks, name, help_text, module.add_arguments, module.run)
    return parser


def _add_command(commands, name: str, help_text: str, add_arguments, handler) -> None:
    command = commands.add_parser(name, help=help_text, description=help_text)
    add_arguments(command)
    command.set_defaults(handler=handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as error:  # user errors: one clear line, no traceback
        parser.exit(2, f"iunet3d: error: {error}\n")
    except OSError as error:  # e.g. a path that cannot be created or written
        parser.exit(2, f"iunet3d: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
