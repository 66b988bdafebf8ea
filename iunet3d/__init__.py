"""iunet3d: memory-efficient training of deep, fully invertible 3D U-Nets on large CT volumes."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from iunet3d.models import iUNet

__all__ = ["iUNet"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that data tools (convert, synth, export) and their worker processes do not import torch.
    if name == "iUNet":
        from iunet3d.models import iUNet

        return iUNet
    raise AttributeError(f"module 'iunet3d' has no attribute {name!r}")
