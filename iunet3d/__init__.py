"""iunet3d: memory-efficient training of deep, fully invertible 3D U-Nets on large CT volumes."""

from iunet3d.models import iUNet

__all__ = ["iUNet"]
__version__ = "0.1.0"
