"""Learnable invertible up- and downsampling (iUNets paper, section 3).

Downsampling by a stride ``s`` (per axis) is a grouped convolution with kernel size = stride = ``s``:
each input channel is mapped to ``m = prod(s)`` output channels by its own orthogonal (m, m) matrix.
Upsampling is the transposed convolution with such a kernel, so each is the exact inverse of the other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from iunet3d.models.orthogonal import (
    OrthogonalMatrices,
    haar_matrix,
    is_orthogonal,
    nearest_orthogonal,
)
from iunet3d.models.precision import full_precision
from iunet3d.models.reversible_engine import Reversal, reverse_through_inverse

RESAMPLING_INITS = ("haar", "squeeze", "pixel_shuffle")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def initial_resampling_matrix(init: str | torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    """The initial (m, m) or (C, m, m) orthogonal matrix for ``init`` and ``stride``."""
    size = math.prod(stride)
    if isinstance(init, np.ndarray):
        init = torch.from_numpy(init)
    if isinstance(init, torch.Tensor):
        if init.shape[-2:] != (size, size) or init.dim() not in (2, 3):
            raise ValueError(
                f"resampling_init tensor must have shape ({size}, {size}) or (C, {size}, {size}) "
                f"for stride {tuple(stride)}, got {tuple(init.shape)}"
            )
        if not is_orthogonal(init.double()):
            raise ValueError("resampling_init tensor must be orthogonal (Q @ Q.T == I)")
        return nearest_orthogonal(init.detach())  # e.g. a float32 QR factor, made exact in float64
    if init == "haar":
        return haar_matrix(stride)
    if init in ("squeeze", "pixel_shuffle"):
        return torch.eye(size, dtype=torch.float64)
    raise ValueError(f"resampling_init must be one of {RESAMPLING_INITS} or a tensor, got {init!r}")


def per_axis_stride(stride: int | Sequence[int], dim: int | None) -> tuple[int, ...]:
    """``stride`` as a tuple of 1 to 3 ints (of length ``dim`` when given)."""
    if isinstance(stride, int) and not isinstance(stride, bool):
        if dim is None:
            raise ValueError(f"stride={stride} is an int: give a per-axis tuple or use a 1D/2D/3D class")
        stride = (stride,) * dim
    stride = tuple(int(s) for s in stride)
    if len(stride) not in _CONV or (dim is not None and len(stride) != dim):
        raise ValueError(f"stride must be a tuple of length {dim or '1, 2 or 3'}, got {stride}")
    return stride


class _OrthogonalResampling(nn.Module):
    """Shared parts of up- and downsampling: the per-channel orthogonal kernel."""

    fixed_dim: int | None = None  # set by the 1D/2D/3D subclasses, which also accept an int stride

    def __init__(
        self,
        in_channels: int,
        stride: int | Sequence[int] = 2,
        method: str = "cayley",
        init: str | torch.Tensor = "haar",
        learnable: bool = True,
    ):
        super().__init__()
        self.stride = per_axis_stride(stride, self.fixed_dim)
        self.dim = len(self.stride)
        self.channels = in_channels  # channels on the high-resolution side
        initial = initial_resampling_matrix(init, self.stride)
        self.matrices = OrthogonalMatrices(in_channels, initial, method, learnable)

    @property
    def factor(self) -> int:
        """m = prod(stride): channel multiplication of downsampling."""
        return math.prod(self.stride)

    def kernel(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Convolution weight (C * m, 1, *stride)."""
        return self.matrices(dtype).reshape(self.channels * self.factor, 1, *self.stride)

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, *S) -> (B, C * m, *S / stride), in x's dtype even under autocast."""
        with full_precision(x):
            return _CONV[self.dim](x, self.kernel(x.dtype), stride=self.stride, groups=self.channels)

    def upsample(self, y: torch.Tensor) -> torch.Tensor:
        """y: (B, C * m, *S) -> (B, C, *S * stride), in y's dtype even under autocast."""
        with full_precision(y):
            return _CONV_TRANSPOSE[self.dim](y, self.kernel(y.dtype), stride=self.stride, groups=self.channels)

    def reverse(self, outputs: list[torch.Tensor]) -> Reversal:
        """Reversible backprop: the input reconstructed through the transposed kernel, then recomputed."""
        return reverse_through_inverse(self, outputs)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, stride={self.stride}, method={self.matrices.method!r}"


class InvertibleDownsampling(_OrthogonalResampling):
    """Learnable invertible downsampling. forward: (B, C, *S) -> (B, C*m, *S/stride); inverse back.

    Args:
        in_channels: C.
        stride: per-axis stride, length 1, 2 or 3 (torch axis order, e.g. (D, H, W)).
        method: ``"cayley"`` or ``"exp"``.
        init: ``"haar"``, ``"squeeze"``/``"pixel_shuffle"`` (identity) or an orthogonal tensor.
        learnable: whether the kernel is trained (else fixed at ``init``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.upsample(y)


class InvertibleUpsampling(_OrthogonalResampling):
    """Learnable invertible upsampling. forward: (B, C*m, *S) -> (B, C, *S*stride); inverse back.

    ``in_channels`` (C*m) must be divisible by m = prod(stride).
    """

    def __init__(self, in_channels, stride=2, method="cayley", init="haar", learnable=True):
        factor = math.prod(per_axis_stride(stride, self.fixed_dim))
        if in_channels % factor:
            raise ValueError(f"in_channels={in_channels} of upsampling must be divisible by prod(stride)={factor}")
        super().__init__(in_channels // factor, stride, method, init, learnable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.downsample(y)


class InvertibleDownsampling1D(InvertibleDownsampling):
    """1D learnable invertible downsampling; ``stride`` may be an int."""

    fixed_dim = 1


class InvertibleDownsampling2D(InvertibleDownsampling):
    """2D learnable invertible downsampling; ``stride`` may be an int."""

    fixed_dim = 2


class InvertibleDownsampling3D(InvertibleDownsampling):
    """3D learnable invertible downsampling; ``stride`` may be an int."""

    fixed_dim = 3


class InvertibleUpsampling1D(InvertibleUpsampling):
    """1D learnable invertible upsampling; ``stride`` may be an int."""

    fixed_dim = 1


class InvertibleUpsampling2D(InvertibleUpsampling):
    """2D learnable invertible upsampling; ``stride`` may be an int."""

    fixed_dim = 2


class InvertibleUpsampling3D(InvertibleUpsampling):
    """3D learnable invertible upsampling; ``stride`` may be an int."""

    fixed_dim = 3
