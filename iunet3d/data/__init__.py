"""CT volumes in Zarr, without torch: the dataset store, conversion, export, synthetic CT, region reads.

Conversion and export are loaded lazily (they import SimpleITK, ~90 MB per process that a training
process and its DataLoader workers need not carry). The patch pipeline moved to ``iunet3d.patches``;
its names are still importable from here for one release, with a DeprecationWarning.
"""

import importlib
import warnings

from iunet3d.data.dataset import CTCase, CTDataset, open_dataset
from iunet3d.data.errors import DataError
from iunet3d.data.normalization import CTNormalization
from iunet3d.data.storage import StorageOptions

_LAZY = {
    "CaseJob": "iunet3d.data.convert",
    "ConversionReport": "iunet3d.data.convert",
    "pair_case_files": "iunet3d.data.convert",
    "run_conversion": "iunet3d.data.convert",
    "export_case": "iunet3d.data.export",
}
_MOVED_TO_PATCHES = (
    "AugmentationConfig",
    "PatchLoader",
    "PatchSampler",
    "PatchStream",
    "ValidationPatches",
    "split_cases",
    "validation_loader",
)

__all__ = [
    "CTCase",
    "CTDataset",
    "CTNormalization",
    "CaseJob",
    "ConversionReport",
    "DataError",
    "StorageOptions",
    "export_case",
    "open_dataset",
    "pair_case_files",
    "run_conversion",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _MOVED_TO_PATCHES:
        warnings.warn(
            f"iunet3d.data.{name} moved to iunet3d.patches.{name}; the old name will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module("iunet3d.patches"), name)
    raise AttributeError(f"module 'iunet3d.data' has no attribute {name!r}")
