"""Every invertible layer of iunet3d in one list, each with small example configurations.

The parametrised layer test runs over ``layer_examples()``; another test fails when a module with an
``inverse`` exists in ``iunet3d.models`` but is missing from ``INVERTIBLE_LAYERS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from iunet3d.models.channel_mixing import InvertibleChannelMixing
from iunet3d.models.coupling import AdditiveCoupling, create_standard_module
from iunet3d.models.level_transitions import SplitAndDownsample, UpsampleAndMerge
from iunet3d.models.resampling import InvertibleDownsampling, InvertibleUpsampling

INVERTIBLE_LAYERS: tuple[type[nn.Module], ...] = (
    AdditiveCoupling,
    InvertibleChannelMixing,
    InvertibleDownsampling,
    InvertibleUpsampling,
    SplitAndDownsample,
    UpsampleAndMerge,
)


@dataclass(frozen=True)
class LayerExample:
    """A layer built by ``build(method)`` and the shapes of its forward inputs (small, so that gradcheck,
    which evaluates the layer twice per input element and parameter, stays cheap)."""

    name: str
    layer_type: type[nn.Module]
    build: Callable[[str], nn.Module]
    input_shapes: tuple[tuple[int, ...], ...]
    orthogonal: bool = True  #: has orthogonal parameters, so ``method`` (exp or cayley) matters


def layer_examples() -> list[LayerExample]:
    """Small configurations of every layer in ``INVERTIBLE_LAYERS``: 1D/2D/3D, iso- and anisotropic."""
    return [
        LayerExample("coupling-3d-even", AdditiveCoupling,
                     lambda method: create_standard_module(4, dim=3, module_index=0), ((2, 4, 2, 3, 3),),
                     orthogonal=False),
        LayerExample("coupling-2d-odd", AdditiveCoupling,
                     lambda method: create_standard_module(5, dim=2, module_index=1, norm="instance"),
                     ((1, 5, 4, 5),), orthogonal=False),
        LayerExample("mixing-1d", InvertibleChannelMixing,
                     lambda method: InvertibleChannelMixing(5, method=method, dim=1), ((2, 5, 8),)),
        LayerExample("mixing-3d", InvertibleChannelMixing,
                     lambda method: InvertibleChannelMixing(4, method=method, dim=3), ((1, 4, 2, 3, 4),)),
        LayerExample("down-3d-iso", InvertibleDownsampling,
                     lambda method: InvertibleDownsampling(2, (2, 2, 2), method=method), ((1, 2, 4, 4, 4),)),
        LayerExample("down-3d-aniso", InvertibleDownsampling,
                     lambda method: InvertibleDownsampling(3, (1, 2, 2), method=method), ((1, 3, 3, 4, 4),)),
        LayerExample("down-2d-stride3", InvertibleDownsampling,
                     lambda method: InvertibleDownsampling(2, (3, 1), method=method, init="haar"), ((1, 2, 6, 4),)),
        LayerExample("up-3d-aniso", InvertibleUpsampling,
                     lambda method: InvertibleUpsampling(8, (1, 2, 2), method=method), ((1, 8, 3, 2, 2),)),
        LayerExample("up-1d", InvertibleUpsampling,
                     lambda method: InvertibleUpsampling(4, (2,), method=method, init="squeeze"), ((2, 4, 5),)),
        LayerExample("split-down-3d-aniso", SplitAndDownsample,
                     lambda method: SplitAndDownsample(3, InvertibleDownsampling(2, (1, 2, 2), method=method)),
                     ((1, 5, 2, 4, 4),)),
        LayerExample("up-merge-2d", UpsampleAndMerge,
                     lambda method: UpsampleAndMerge(2, InvertibleUpsampling(8, (2, 2), method=method)),
                     ((1, 2, 4, 4), (1, 8, 2, 2))),
    ]  # fmt: skip
