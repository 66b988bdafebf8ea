"""Invertible layers and the iUNet. Knows nothing of DDP, Zarr, TorchIO or W&B."""

from iunet3d.models.iunet import iUNet

__all__ = ["iUNet"]
