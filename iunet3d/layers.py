"""The invertible layers, under the original library's module name (``iunets.layers``).

``from iunet3d.layers import create_standard_module`` replaces ``from iunets.layers import ...``.
"""

from iunet3d.models.channel_mixing import (
    InvertibleChannelMixing,
    InvertibleChannelMixing1D,
    InvertibleChannelMixing2D,
    InvertibleChannelMixing3D,
)
from iunet3d.models.coupling import AdditiveCoupling, StandardBlock, create_standard_module
from iunet3d.models.level_transitions import SplitAndDownsample, UpsampleAndMerge
from iunet3d.models.resampling import (
    InvertibleDownsampling,
    InvertibleDownsampling1D,
    InvertibleDownsampling2D,
    InvertibleDownsampling3D,
    InvertibleUpsampling,
    InvertibleUpsampling1D,
    InvertibleUpsampling2D,
    InvertibleUpsampling3D,
)

__all__ = [
    "AdditiveCoupling",
    "InvertibleChannelMixing",
    "InvertibleChannelMixing1D",
    "InvertibleChannelMixing2D",
    "InvertibleChannelMixing3D",
    "InvertibleDownsampling",
    "InvertibleDownsampling1D",
    "InvertibleDownsampling2D",
    "InvertibleDownsampling3D",
    "InvertibleUpsampling",
    "InvertibleUpsampling1D",
    "InvertibleUpsampling2D",
    "InvertibleUpsampling3D",
    "SplitAndDownsample",
    "StandardBlock",
    "UpsampleAndMerge",
    "create_standard_module",
]
