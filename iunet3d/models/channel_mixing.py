"""Learnable invertible channel mixing: an orthogonal 1x1 convolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iunet3d.models.orthogonal import OrthogonalMatrices
from iunet3d.models.precision import full_precision
from iunet3d.models.reversible_engine import Reversal, reverse_through_inverse

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class InvertibleChannelMixing(nn.Module):
    """y = Q x over channels, Q orthogonal (C, C). x, y: (B, C, *S) with len(S) == dim.

    Starts at the identity, so a fresh network is unchanged by it. ``dim`` is fixed by the
    1D/2D/3D subclasses.
    """

    fixed_dim: int | None = None

    def __init__(self, in_channels: int, method: str = "cayley", learnable: bool = True, *, dim: int | None = None):
        super().__init__()
        dim = dim or self.fixed_dim
        if dim not in _CONV:
            raise ValueError(f"dim must be 1, 2 or 3, got {dim}")
        self.channels = in_channels
        self.dim = dim
        initial = torch.eye(in_channels, dtype=torch.float64)
        self.matrices = OrthogonalMatrices(1, initial, method, learnable)

    def _kernel(self, dtype: torch.dtype, transpose: bool) -> torch.Tensor:
        matrix = self.matrices(dtype)[0]
        if transpose:
            matrix = matrix.T
        return matrix.reshape(self.channels, self.channels, *([1] * self.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, *S) -> Q x, in x's dtype even under autocast."""
        with full_precision(x):
            return _CONV[self.dim](x, self._kernel(x.dtype, transpose=False))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """y: (B, C, *S) -> Q^T y."""
        with full_precision(y):
            return _CONV[self.dim](y, self._kernel(y.dtype, transpose=True))

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
