"""Additive coupling layers and the standard coupling function (conv-norm-activation stack)."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from iunet3d.models.precision import function_input
from iunet3d.models.reversible_engine import Reversal, leaf

NORMS = ("group", "instance", "batch", None)
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_INSTANCE_NORM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _group_count(channels: int, max_groups: int) -> int:
    """The largest divisor of ``channels`` that is at most ``max_groups``."""
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


def make_norm(norm: str | None, channels: int, dim: int, num_groups: int = 8) -> nn.Module:
    """A normalisation layer. BatchNorm is allowed but not the default: it couples the samples of a batch,
    and under the memcnn engine its running statistics are updated three times per step (forward,
    inverse, recompute; the fused engine restores them after its recomputation)."""
    if norm == "group":
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        return nn.GroupNorm(_group_count(channels, num_groups), channels)
    if norm == "instance":
        return _INSTANCE_NORM[dim](channels, affine=True)
    if norm == "batch":
        warnings.warn(
            "norm='batch' in a coupling function: BatchNorm couples the samples of a batch, and with "
            "reversible_engine='memcnn' its running statistics are updated three times per step; prefer 'group' "
            "or 'instance'",
            stacklevel=2,
        )
        return _BATCH_NORM[dim](channels)
    if norm is None or norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class StandardBlock(nn.Sequential):
    """The coupling function: ``block_depth`` convolutions, norm + LeakyReLU between them.

    (B, in_channels, *S) -> (B, out_channels, *S). With ``zero_init`` the last convolution starts at
    zero, so the coupling it sits in starts as the identity.
    """

    def __init__(
        self,
        dim: int,
        in_channels: int,
        out_channels: int,
        block_depth: int = 2,
        kernel_size: int = 3,
        norm: str | None = "group",
        num_groups: int = 8,
        zero_init: bool = True,
    ):
        if block_depth < 1:
            raise ValueError(f"block_depth must be >= 1, got {block_depth}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (same-size output), got {kernel_size}")
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(block_depth - 1):
            layers += [
                _CONV[dim](channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                make_norm(norm, out_channels, dim, num_groups),
                nn.LeakyReLU(0.01),
            ]
            channels = out_channels
        last = _CONV[dim](channels, out_channels, kernel_size, padding=kernel_size // 2)
        if zero_init:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        layers.append(last)
        super().__init__(*layers)


class AdditiveCoupling(nn.Module):
    """Additive coupling on a channel split at ``split_position``. x, y: (B, C, *S).

    ``x = (a, b)``; if ``update_second``: ``y = (a, b + F(a))``, else ``y = (a + F(b), b)``.
    The output is a new tensor (never a view of the input), as reversible wrappers require.
    """

    def __init__(self, function: nn.Module, split_position: int, update_second: bool = True):
        super().__init__()
        self.function = function
        self.split_position = split_position
        self.update_second = update_second

    #: ``forward`` takes ``reuse_input`` (``InferencePass`` passes it)
    can_reuse_input = True

    def forward(self, x: torch.Tensor, *, reuse_input: bool = False) -> torch.Tensor:
        """x -> y. With ``reuse_input`` and gradients off (inference; the caller gives ``x`` up) one half of
        ``x`` is updated in place and ``x`` itself returned: neither a sum nor a concatenated copy."""
        a, b = x[:, : self.split_position], x[:, self.split_position :]
        if reuse_input and not torch.is_grad_enabled():
            if self.update_second:
                b += self._function(a)
            else:
                a += self._function(b)
            return x
        if self.update_second:
            return torch.cat([a, b + self._function(a)], dim=1)
        return torch.cat([a + self._function(b), b], dim=1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        a, b = y[:, : self.split_position], y[:, self.split_position :]
        if self.update_second:
            return torch.cat([a, b - self._function(a)], dim=1)
        return torch.cat([a - self._function(b), b], dim=1)

    def _function(self, half: torch.Tensor) -> torch.Tensor:
        """F(half), its input rounded as ``function_input`` says when the carried tensors are float64."""
        parameter = next(self.function.parameters(), None)
        return self.function(function_input(half, None if parameter is None else parameter.dtype))

    def reverse(self, outputs: list[torch.Tensor]) -> Reversal:
        """One evaluation of the function, with grad, both reconstructs the input and recomputes the output
        (reversible backprop): ``f = F(a); b = y_b - f``, output pieces ``(a, b + f)``. outputs: [y]."""
        (y,) = outputs
        first, second = y[:, : self.split_position], y[:, self.split_position :]
        if self.update_second:
            a = leaf(first)
            f = self._function(a)
            b = leaf(second - f.detach())
            return Reversal(inputs=((a, b),), outputs=((a, b + f),))
        b = leaf(second)
        f = self._function(b)
        a = leaf(first - f.detach())
        return Reversal(inputs=((a, b),), outputs=((a + f, b),))


def create_standard_module(
    in_channels: int,
    *,
    dim: int = 2,
    module_index: int = 0,
    LR: str | None = None,  # noqa: N803 (the original library's keyword)
    level: int | None = None,
    architecture: tuple[int, ...] | None = None,
    block_depth: int = 2,
    kernel_size: int = 3,
    norm: str | None = "group",
    num_groups: int = 8,
    zero_init: bool = True,
) -> AdditiveCoupling:
    """The default invertible layer of an iUNet: an additive coupling around a ``StandardBlock``.

    The iUNet calls ``create_module_fn(channels, dim=, module_index=, LR=, level=, architecture=,
    **module_kwargs)`` as the original library does (``LR`` is ``"L"`` on the encoder side and ``"R"``
    on the decoder side; ``level`` and ``architecture`` are for custom functions and unused here).
    The half that is updated alternates with ``module_index`` so that, with an odd channel count,
    both halves are updated by consecutive layers.
    """
    if in_channels < 2:
        raise ValueError(f"an additive coupling needs at least 2 channels to split, got {in_channels}")
    split_position = in_channels // 2
    update_second = module_index % 2 == 0
    function_in, function_out = split_position, in_channels - split_position
    if not update_second:
        function_in, function_out = function_out, function_in
    block = StandardBlock(dim, function_in, function_out, block_depth, kernel_size, norm, num_groups, zero_init)
    return AdditiveCoupling(block, split_position, update_second)
