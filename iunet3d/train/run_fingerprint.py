"""What a training run trains on and what it trains, as plain dicts for the W&B run config (no W&B here).

``dataset_fingerprint``: the dataset's path, case counts, classes and spacing statistics, and the target spacing
in use; ``network_layout``: the network as built (levels, strides, channels, parameter count). Both let runs be
compared and grouped on a dashboard without opening their configs.
"""

from __future__ import annotations

from collections.abc import Sequence

from iunet3d.models.segmentation import SegmentationIUNet


def dataset_fingerprint(dataset, train_cases: Sequence[str], validation_cases: Sequence[str],
                        target_spacing: Sequence[float] | None) -> dict:  # fmt: skip
    """The ``dataset`` config entry of a run on ``dataset`` (a ``CTDataset``) split into ``train_cases`` and
    ``validation_cases``. ``spacing``: per-axis (z, y, x) median, min and max voxel spacing in mm from the dataset
    statistics (None each when it has none); ``target_spacing``: the spacing patches are resampled to, or
    ``"native"`` (the cases' own voxels)."""
    spacing = dataset.statistics.get("spacing") or {}
    return {
        "path": str(dataset.path),
        "cases": len(dataset.case_names),
        "training_cases": len(train_cases),
        "validation_cases": len(validation_cases),
        "class_names": list(dataset.class_names),
        "spacing": {key: _floats(spacing.get(key)) for key in ("median", "min", "max")},
        "target_spacing": "native" if target_spacing is None else _floats(target_spacing),
    }


def network_layout(network: SegmentationIUNet, block_depth: int) -> dict:
    """The ``network`` config entry: the resolved layout of ``network`` (couplings per level, one (z, y, x)
    resampling stride per level transition, feature channels per level), its ``block_depth`` (from the config:
    the network does not keep it) and its number of parameters."""
    iunet = network.iunet
    return {
        "architecture": list(iunet.architecture),
        "levels": iunet.num_levels,
        "resampling_strides": [list(stride) for stride in iunet.resampling_stride],
        "channels": list(iunet.channels),
        "downsampling_factors": list(iunet.downsampling_factors),
        "block_depth": block_depth,
        "parameters": sum(parameter.numel() for parameter in network.parameters()),
    }


def _floats(values: Sequence[float] | None) -> list[float] | None:
    return None if values is None else [float(value) for value in values]
