"""Training and validation patches from a dataset: sampling, streaming to DataLoader workers, TorchIO.

The only folder that imports TorchIO (in ``transforms``, loaded when augmentation is switched on).
"""

from iunet3d.patches.augmentation import AugmentationConfig
from iunet3d.patches.patch_loader import PatchLoader, validation_loader
from iunet3d.patches.patch_stream import PatchStream
from iunet3d.patches.sampling import PatchSampler, split_cases
from iunet3d.patches.validation_patches import ValidationPatches

__all__ = [
    "AugmentationConfig",
    "PatchLoader",
    "PatchSampler",
    "PatchStream",
    "ValidationPatches",
    "split_cases",
    "validation_loader",
]
