"""CT volumes in Zarr: the dataset store, conversion, synthetic CT, region reads, and training patches.

Loaded lazily: ``PatchStream``, ``PatchLoader``, ``ValidationPatches`` and ``validation_loader`` (they
import torch, so the data tools and their workers do not), and conversion and export (they import
SimpleITK, ~90 MB per process that a training process and its DataLoader workers need not carry).
"""

from iunet3d.data.augmentation import AugmentationConfig
from iunet3d.data.dataset import CTCase, CTDataset, open_dataset
from iunet3d.data.errors import DataError
from iunet3d.data.normalization import CTNormalization
from iunet3d.data.sampling import PatchSampler, split_cases
from iunet3d.data.storage import StorageOptions

_LAZY = {
    "CaseJob": "iunet3d.data.convert",
    "ConversionReport": "iunet3d.data.convert",
    "pair_case_files": "iunet3d.data.convert",
    "run_conversion": "iunet3d.data.convert",
    "export_case": "iunet3d.data.export",
    "PatchStream": "iunet3d.data.patch_stream",
    "PatchLoader": "iunet3d.data.patch_loader",
    "validation_loader": "iunet3d.data.patch_loader",
    "ValidationPatches": "iunet3d.data.validation_patches",
}

__all__ = [
    "AugmentationConfig",
    "CTCase",
    "CTDataset",
    "CTNormalization",
    "CaseJob",
    "ConversionReport",
    "DataError",
    "PatchLoader",
    "PatchSampler",
    "PatchStream",
    "StorageOptions",
    "ValidationPatches",
    "export_case",
    "open_dataset",
    "pair_case_files",
    "run_conversion",
    "split_cases",
    "validation_loader",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'iunet3d.data' has no attribute {name!r}")
