"""Reversible backprop with one recomputation per block: the ``"fused"`` engine.

Forward runs every invertible layer without recording a graph, so no layer keeps its input. Backward
walks the layers in reverse: each one is handed its output (reconstructed by the layer after it, or
kept by this engine when the output left the network) and calls its ``reverse``, which evaluates the
layer's function once with grad enabled and uses that single evaluation twice: to reconstruct the
layer's input and, through autograd, to backpropagate. For an additive coupling ``y = (a, b + F(a))``::

    a = y1;  f = F(a);  b = y2 - f        # input reconstructed from the one evaluation of F
    outputs recomputed as (a, b + f)      # autograd differentiates the block's own forward

The reconstructed input is handed to the backward of the layer that produced it, and the gradients of
the input and of the layer's parameters are returned to autograd like those of any other operation:
DDP's hooks, ``torch.autograd.grad`` and leaf inputs see ordinary gradients. Nothing of the caller's is
freed or changed.

The recomputation runs under the autocast state and the random-number state of forward, so the function
is re-evaluated on the same inputs and ``y2 - f`` cancels what forward added. Under autocast that needs
the carried tensors in float64 (``iunet3d.models.precision``): the reconstruction then rounds the
function's input to exactly the values forward used.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable


class Reversal(NamedTuple):
    """A layer's backward recomputation, from ``layer.reverse(outputs)``.

    inputs: per layer input, its channel pieces (tensors requiring grad; the input is their
        concatenation along dim 1), reconstructed from the outputs.
    outputs: per layer output, its channel pieces recomputed from ``inputs`` with grad enabled (a
        piece may be an input piece itself, passed through unchanged).
    """

    inputs: tuple[tuple[torch.Tensor, ...], ...]
    outputs: tuple[tuple[torch.Tensor, ...], ...]


def leaf(tensor: torch.Tensor) -> torch.Tensor:
    """A new graph leaf requiring grad with the value of ``tensor``."""
    return tensor.detach().requires_grad_()


def as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def reverse_through_inverse(layer: nn.Module, outputs: list[torch.Tensor]) -> Reversal:
    """The reversal of a layer without a function to share: its inputs reconstructed by ``inverse``, then
    its forward recomputed from them with grad (for orthogonal resampling and mixing, the inverse is
    the transposed operator). The outputs are released before the recomputation."""
    with torch.no_grad():
        inputs = as_tuple(layer.inverse(*outputs))
    outputs.clear()
    leaves = tuple(leaf(x) for x in inputs)
    return Reversal(tuple((x,) for x in leaves), tuple((y,) for y in as_tuple(layer(*leaves))))


def reverse(layer: nn.Module, outputs: list[torch.Tensor]) -> Reversal:
    """``layer.reverse(outputs)``, or ``reverse_through_inverse`` for a layer without ``reverse`` (a custom
    invertible layer: two evaluations of its function instead of one).

    ``outputs`` holds the engine's only references to the layer's output values: a layer may empty it
    (and drop its own references) once its inputs are reconstructed, so that the outputs are freed
    before the recomputation allocates new tensors.
    """
    if hasattr(layer, "reverse"):
        return layer.reverse(outputs)
    return reverse_through_inverse(layer, outputs)


class _Handoff:
    """One tensor between two layers: what the producing layer's backward will need as its output.

    After forward it holds a detached alias of the output (no graph, so no reference cycle). When a
    later layer consumes the tensor, or the tensor leaves the network through ``ReversibleTape.outputs``,
    the alias is dropped so the tensor can be freed; that layer's backward (or ``_Outputs``) then leaves
    the value here. An output that was neither keeps its alias, checked against in-place changes.
    """

    __slots__ = ("value", "version", "reconstructed")

    def __init__(self, output: torch.Tensor):
        self.value: torch.Tensor | None = output.detach()
        self.version = output._version
        self.reconstructed = False

    def release(self) -> None:
        self.value = None

    def deliver(self, value: torch.Tensor) -> None:
        self.value, self.reconstructed = value, True

    def take(self, layer: nn.Module) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError(
                f"reversible backward of {type(layer).__name__}: its output was not reconstructed, because the "
                "layer that consumed it received no gradient. Run backward from outputs that depend on the whole "
                "network, or use disable_custom_gradient=True"
            )
        if not self.reconstructed and value._version != self.version:
            raise RuntimeError(
                f"reversible backward of {type(layer).__name__}: its output was modified in place after forward, "
                "so the input cannot be reconstructed from it. Modify a copy (y.clone()) instead"
            )
        if not self.reconstructed:
            self.value = value  # kept for a second backward through the same graph (retain_graph=True)
        return value


class _AutocastState(NamedTuple):
    device_type: str
    enabled: bool
    dtype: torch.dtype
    cache_enabled: bool

    @classmethod
    def current(cls, device_type: str) -> _AutocastState:
        if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
            return cls(device_type, False, torch.float32, True)
        return cls(device_type, True, torch.get_autocast_dtype(device_type), torch.is_autocast_cache_enabled())

    def context(self):
        if not self.enabled:
            return torch.autocast(self.device_type if self.device_type in ("cpu", "cuda") else "cpu", enabled=False)
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=self.cache_enabled)


class _RandomState:
    """The CPU (and the input's CUDA device) random state at forward, restored for the recomputation so
    that a layer drawing random numbers (dropout) recomputes exactly what forward computed."""

    __slots__ = ("cpu", "cuda_device", "cuda")

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda_device = device.index if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def restored(self):
        devices = [] if self.cuda_device is None else [self.cuda_device]
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_device)
            yield


class _ReversibleLayer(torch.autograd.Function):
    """One invertible layer: forward without a graph, backward by ``reverse`` (see the module docstring)."""

    @staticmethod
    def forward(ctx, layer, input_handoffs, output_handoffs, num_inputs, *inputs_and_parameters):
        inputs, parameters = inputs_and_parameters[:num_inputs], inputs_and_parameters[num_inputs:]
        ctx.layer, ctx.input_handoffs, ctx.output_handoffs = layer, input_handoffs, output_handoffs
        ctx.autocast = _AutocastState.current(inputs[0].device.type)
        ctx.random_state = _RandomState(inputs[0].device)
        ctx.parameter_ids = [id(p) for p in parameters]
        ctx.save_for_backward(*parameters)
        outputs = as_tuple(layer(*inputs))
        output_handoffs.extend(_Handoff(output) for output in outputs)
        return outputs if len(outputs) > 1 else outputs[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs):
        layer = ctx.layer
        parameters = ctx.saved_tensors
        if [id(p) for p in _trainable(layer)] != ctx.parameter_ids:
            raise RuntimeError(
                f"reversible backward of {type(layer).__name__}: its parameters were replaced between forward and "
                "backward; the recomputation uses the layer's own parameters"
            )
        outputs = [handoff.take(layer) for handoff in ctx.output_handoffs]
        with torch.enable_grad(), ctx.autocast.context(), ctx.random_state.restored(), _frozen_batch_norm(layer):
            reversal = reverse(layer, outputs)
            del outputs
            recomputed, grads = [], []
            for pieces, grad in zip(reversal.outputs, grad_outputs, strict=True):
                recomputed += pieces
                grads += grad.split([p.shape[1] for p in pieces], dim=1) if len(pieces) > 1 else [grad]
            leaves = [piece for pieces in reversal.inputs for piece in pieces]
            needed = [piece for piece in leaves if piece.requires_grad] + list(parameters)
            found = torch.autograd.grad(recomputed, needed, grads, allow_unused=True)
        del recomputed, grads
        by_leaf = dict(zip(map(id, needed), found, strict=True))
        input_grads = []
        for index, (pieces, handoff) in enumerate(zip(reversal.inputs, ctx.input_handoffs, strict=True)):
            if handoff is not None:
                handoff.deliver(_concatenate([piece.detach() for piece in pieces]))
            if ctx.needs_input_grad[4 + index]:
                piece_grads = [by_leaf.get(id(piece)) for piece in pieces]
                piece_grads = [
                    torch.zeros_like(p) if g is None else g for p, g in zip(pieces, piece_grads, strict=True)
                ]
                input_grads.append(_concatenate(piece_grads))
            else:
                input_grads.append(None)
        parameter_grads = found[len(needed) - len(parameters) :]
        return (None, None, None, None, *input_grads, *parameter_grads)


def _concatenate(pieces: list[torch.Tensor]) -> torch.Tensor:
    """The pieces as one tensor that owns its memory (a view would keep its base alive)."""
    if len(pieces) > 1:
        return torch.cat(pieces, dim=1)
    tensor = pieces[0]
    return tensor.clone() if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size() else tensor


def _trainable(layer: nn.Module) -> list[nn.Parameter]:
    return [p for p in layer.parameters() if p.requires_grad]


class _frozen_batch_norm:
    """Keeps the running statistics of BatchNorm layers unchanged during the recomputation, so that a
    training step updates them once (in forward), as without reversible backprop."""

    def __init__(self, layer: nn.Module):
        self.norms = [m for m in layer.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]

    def __enter__(self):
        self.saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False) if v is not None} for m in self.norms]

    def __exit__(self, *exc):
        with torch.no_grad():
            for module, buffers in zip(self.norms, self.saved, strict=True):
                for name, value in buffers.items():
                    getattr(module, name).copy_(value)


class _Outputs(torch.autograd.Function):
    """The outputs of one pass, saved by autograd until backward reaches them (and freed then, unless the
    graph is retained), and handed to the layers that produced them. With several outputs, backward from
    any of them reaches every layer (unused outputs give zero gradients), so each layer gets its outputs."""

    @staticmethod
    def forward(ctx, handoffs, *tensors):
        ctx.handoffs = handoffs
        ctx.save_for_backward(*tensors)
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        for handoff, value in zip(ctx.handoffs, ctx.saved_tensors, strict=True):
            if handoff is not None:
                handoff.deliver(value)
        return (None, *grads)


class ReversibleTape:
    """Runs invertible layers for one pass (one call of the network) with reversible backprop.

    ``tape(layer, *inputs)`` applies the layer and remembers which layer produced each output, so the
    layer that consumes it can hand its reconstruction back in backward. Layers that need no gradient
    (grad mode off, or nothing requiring grad) run as plain calls. ``tape.outputs(tensors)`` returns the
    pass's outputs, kept for backward by autograd rather than by the tape (see ``_Outputs``).
    """

    def __init__(self):
        self._produced: dict[int, tuple[weakref.ref, _Handoff]] = {}

    def __call__(self, layer: nn.Module, *inputs: torch.Tensor):
        parameters = _trainable(layer)
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in (*inputs, *parameters)):
            return layer(*inputs)
        input_handoffs = tuple(self._consume(x) for x in inputs)
        output_handoffs: list[_Handoff] = []
        result = _ReversibleLayer.apply(layer, input_handoffs, output_handoffs, len(inputs), *inputs, *parameters)
        for output, handoff in zip(as_tuple(result), output_handoffs, strict=True):
            self._produced[id(output)] = (weakref.ref(output), handoff)
        return result

    def outputs(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        tensors = list(tensors)
        if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
            return tensors
        handoffs = tuple(self._consume(t) for t in tensors)
        return list(as_tuple(_Outputs.apply(handoffs, *tensors)))

    def _consume(self, tensor: torch.Tensor) -> _Handoff | None:
        entry = self._produced.pop(id(tensor), None)
        if entry is None or entry[0]() is not tensor:
            return None
        entry[1].release()
        return entry[1]
