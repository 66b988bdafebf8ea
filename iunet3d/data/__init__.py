"""CT volumes in Zarr: the dataset store, conversion, synthetic CT, region reads, and training patches.

``PatchStream``, ``PatchLoader``, ``ValidationPatches`` and ``validation_loader`` import torch (and TorchIO
when augmenting); they are loaded lazily so that the data tools and their workers do not import torch.
"""

from iunet3d.data.augmentation import AugmentationConfig
from iunet3d.data.convert import CaseJob, ConversionReport, pair_case_files, run_conversion
from iunet3d.data.dataset import CTCase, CTDataset, open_dataset
from iunet3d.data.errors import DataError
from iunet3d.data.export import export_case
from iunet3d.data.normalization import CTNormalization
from iunet3d.data.sampling import PatchSampler, split_cases
from iunet3d.data.storage import StorageOptions

_LAZY = {
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
