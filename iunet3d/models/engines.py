"""How the iUNet applies its invertible layers in one pass: plain autograd, or a reversible engine.

- ``PlainPass``: ordinary autograd, which stores activations (``disable_custom_gradient=True``, and the
  passes without gradients other than ``forward``'s).
- ``InferencePass``: ``forward`` without gradients; a layer that can reuse its input's memory does
  (``reuse_input=True``: the couplings add in place, the split hands back a view).
- ``FusedPass`` (``reversible_engine="fused"``, the default): ``ReversibleTape``, one recomputation per
  block.
- ``MemcnnPass`` (``reversible_engine="memcnn"``): memcnn's wrapper, the reference implementation.

A pass object is made per call of the network: ``run(layer, *inputs)``, ``run.inverse(layer, *outputs)``
and ``run.outputs(tensors)`` for what the pass returns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from iunet3d.models.reversible_engine import ReversibleTape

REVERSIBLE_ENGINES = ("fused", "memcnn")


class PlainPass:
    """Layers called directly; autograd records (and stores) what it needs."""

    def __call__(self, layer: nn.Module, *inputs: torch.Tensor):
        return layer(*inputs)

    def inverse(self, layer: nn.Module, *outputs: torch.Tensor):
        return layer.inverse(*outputs)

    def outputs(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(tensors)


class InferencePass(PlainPass):
    """Layers called without gradients on activations the pass owns: a layer that ``can_reuse_input`` is
    called with ``reuse_input=True`` (the same result, written into its input or sharing its memory), so
    inference allocates and copies less. The caller of the pass gives up the tensors it hands in (the
    iUNet copies its caller's input first)."""

    def __call__(self, layer: nn.Module, *inputs: torch.Tensor):
        if getattr(layer, "can_reuse_input", False):
            return layer(*inputs, reuse_input=True)
        return layer(*inputs)


class _InverseOf:
    """A layer run backwards, as the engine sees it: calling it is the layer's inverse, its inverse the
    layer's forward, and it has the layer's parameters."""

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def __call__(self, *outputs: torch.Tensor):
        return self.layer.inverse(*outputs)

    def inverse(self, *inputs: torch.Tensor):
        return self.layer(*inputs)

    def parameters(self):
        return self.layer.parameters()

    def modules(self):
        return self.layer.modules()


class FusedPass(ReversibleTape):
    """The fused reversible engine; the inverse direction is reversible too (inverse, then recompute)."""

    def inverse(self, layer: nn.Module, *outputs: torch.Tensor):
        return self(_InverseOf(layer), *outputs)


class _OwnedOutputs:
    """A layer as memcnn sees it: outputs that are never views (memcnn detaches them in place, which views
    refuse), and the layer's parameters."""

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def parameters(self):
        return self.layer.parameters()

    @staticmethod
    def _owned(result):
        if isinstance(result, tuple):
            return tuple(t.clone() if t._base is not None else t for t in result)
        return result.clone() if result._base is not None else result

    def forward(self, *inputs: torch.Tensor):
        return self._owned(self.layer(*inputs))

    __call__ = forward

    def inverse(self, *outputs: torch.Tensor):
        return self._owned(self.layer.inverse(*outputs))


class MemcnnPass:
    """memcnn's ``InvertibleModuleWrapper`` around each layer; the wrappers are cached in ``wrappers``
    (not registered as modules, so the state dict is the same for every engine). The layers in
    ``keep_inputs`` receive the caller's tensors: memcnn must not free those."""

    def __init__(self, wrappers: dict[int, nn.Module], keep_inputs: tuple[nn.Module, nn.Module]):
        from iunet3d.models.memcnn_engine import memcnn_wrapper

        self._wrap, self._wrappers = memcnn_wrapper, wrappers
        self._first, self._last = keep_inputs

    def _wrapper(self, layer: nn.Module) -> nn.Module:
        wrapper = self._wrappers.get(id(layer))
        if wrapper is None or wrapper._fn.layer is not layer:
            keep = {"keep_input": layer is self._first, "keep_input_inverse": layer is self._last}
            wrapper = self._wrap(_OwnedOutputs(layer), **keep)
            self._wrappers[id(layer)] = wrapper
        return wrapper

    def __call__(self, layer: nn.Module, *inputs: torch.Tensor):
        return self._wrapper(layer)(*inputs)

    def inverse(self, layer: nn.Module, *outputs: torch.Tensor):
        return self._wrapper(layer).inverse(*outputs)

    def outputs(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(tensors)
