"""Learnable invertible channel mixing: an orthogonal 1x1 convolution. Channels-first activations are mixed
as a matrix product over the channel axis (PyTorch's CPU 1x1x1 convolution of a contiguous 2x16x16x64x64
tensor: 9.2 ms against 1.4 ms as a product); channels-last ones as a 1x1 convolution, which oneDNN and cuDNN
run natively in that layout (on 2 CPU cores, 2x16x16x64x64: 0.9 ms against 2.6 ms as a product over the
last axis, whose skinny 16x16 matrix the BLAS handles poorly)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iunet3d.models.orthogonal import OrthogonalMatrices
from iunet3d.models.precision import full_precision
from iunet3d.models.reversible_engine import Reversal, reverse_through_inverse

DIMS = (1, 2, 3)
_CHANNELS_LAST = {4: (torch.channels_last, F.conv2d), 5: (torch.channels_last_3d, F.conv3d)}


def mix_channels(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``matrix @ x`` over the channel axis: x (B, C, *S), matrix (C, C) -> (B, C, *S) in x's memory format,
    without copying x: channels-first as (C, C) @ (C, S) per batch element (a view of the product);
    channels-last (4-D or 5-D) as a 1x1 convolution; any other layout as (B*S, C) @ (C, C)^T."""
    if x.is_contiguous():
        return torch.matmul(matrix, x.view(x.shape[0], x.shape[1], -1)).view(x.shape)
    if x.dim() in _CHANNELS_LAST:
        memory_format, convolution = _CHANNELS_LAST[x.dim()]
        if x.is_contiguous(memory_format=memory_format):
            mixed = convolution(x, matrix.reshape(*matrix.shape, *(1,) * (x.dim() - 2)))
            return mixed.contiguous(memory_format=memory_format)  # as it is, except off oneDNN (e.g. float64)
    return F.linear(x.movedim(1, -1), matrix).movedim(-1, 1)


class InvertibleChannelMixing(nn.Module):
    """y = Q x over channels, Q orthogonal (C, C). x, y: (B, C, *S) with len(S) == dim.

    Starts at the identity, so a fresh network is unchanged by it. ``dim`` is fixed by the
    1D/2D/3D subclasses.
    """

    fixed_dim: int | None = None

    def __init__(self, in_channels: int, method: str = "cayley", learnable: bool = True, *, dim: int | None = None):
        super().__init__()
        dim = dim or self.fixed_dim
        if dim not in DIMS:
            raise ValueError(f"dim must be 1, 2 or 3, got {dim}")
        self.channels = in_channels
        self.dim = dim
        initial = torch.eye(in_channels, dtype=torch.float64)
        self.matrices = OrthogonalMatrices(1, initial, method, learnable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, *S) -> Q x, in x's dtype even under autocast."""
        with full_precision(x):
            return mix_channels(x, self.matrices(x.dtype)[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """y: (B, C, *S) -> Q^T y."""
        with full_precision(y):
            return mix_channels(y, self.matrices(y.dtype)[0].T)

    def reverse(self, outputs: list[torch.Tensor]) -> Reversal:
        """Reversible backprop: the input reconstructed through Q^T, then recomputed."""
        return reverse_through_inverse(self, outputs)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, dim={self.dim}, method={self.matrices.method!r}"


class InvertibleChannelMixing1D(InvertibleChannelMixing):
    """1D learnable invertible channel mixing (orthogonal 1x1 convolution)."""

    fixed_dim = 1


class InvertibleChannelMixing2D(InvertibleChannelMixing):
    """2D learnable invertible channel mixing (orthogonal 1x1 convolution)."""

    fixed_dim = 2


class InvertibleChannelMixing3D(InvertibleChannelMixing):
    """3D learnable invertible channel mixing (orthogonal 1x1 convolution)."""

    fixed_dim = 3
