"""Learnable orthogonal matrices: a skew-symmetric parameter mapped through exp or Cayley.

Gradients come from autograd through ``torch.linalg.matrix_exp`` / ``torch.linalg.solve``; there
is no hand-written backward (the original iunets library's hand-written one gave wrong gradients).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

ORTHOGONAL_METHODS = ("exp", "cayley")


def skew_symmetric(weight: torch.Tensor) -> torch.Tensor:
    """``weight - weight^T`` over the last two axes. weight: (..., m, m)."""
    return weight - weight.transpose(-1, -2)


def orthogonal_from_skew(skew: torch.Tensor, method: str) -> torch.Tensor:
    """Map skew-symmetric matrices (..., m, m) to orthogonal matrices (..., m, m).

    ``"exp"``: the matrix exponential; ``"cayley"``: ``(I - A)^-1 (I + A)``. Both give the identity
    at ``A = 0``.
    """
    if method == "exp":
        return torch.linalg.matrix_exp(skew)
    if method == "cayley":
        eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device)
        return torch.linalg.solve(eye - skew, eye + skew)
    raise ValueError(f"orthogonal method must be one of {ORTHOGONAL_METHODS}, got {method!r}")


def dct_matrix(size: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix (size, size); row 0 is the mean. For size 2 it is the Haar matrix."""
    rows = torch.arange(size, dtype=torch.float64)[:, None]
    cols = torch.arange(size, dtype=torch.float64)[None, :]
    matrix = torch.cos(math.pi * (2 * cols + 1) * rows / (2 * size)) * math.sqrt(2 / size)
    matrix[0] /= math.sqrt(2)
    return matrix


def haar_matrix(stride: Sequence[int]) -> torch.Tensor:
    """Separable Haar transform for a block of shape ``stride``: (m, m) with m = prod(stride).

    It is the Kronecker product of one matrix per axis, in axis order (row-major like the conv
    kernel): the Haar matrix ``[[1, 1], [1, -1]] / sqrt(2)`` along a stride-2 axis, the identity
    along a stride-1 axis, and the orthonormal DCT-II (Haar's generalisation whose first row is the
    block mean) along any other stride. Row 0 is the block mean (the low-pass channel).
    """
    matrix = torch.ones(1, 1, dtype=torch.float64)
    for axis_stride in stride:
        matrix = torch.kron(matrix, dct_matrix(axis_stride))
    return matrix


def nearest_orthogonal(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrices closest to ``matrix`` (..., m, m) in float64 (polar factor U V^T)."""
    u, _, vh = torch.linalg.svd(matrix.to(torch.float64))
    return u @ vh


def is_orthogonal(matrix: torch.Tensor, tolerance: float = 1e-5) -> bool:
    """Whether every (m, m) matrix in ``matrix`` (..., m, m) is orthogonal within ``tolerance``."""
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype)
    return bool(torch.allclose(matrix @ matrix.transpose(-1, -2), eye.expand_as(matrix), atol=tolerance))


class OrthogonalMatrices(nn.Module):
    """``count`` orthogonal (size, size) matrices ``Q_c = f(W_c - W_c^T) @ Q0_c``.

    ``W`` starts at zero so the layer starts at ``Q0`` (the initial matrices, a buffer). With
    ``learnable=False`` there is no parameter and the matrices stay ``Q0``.

    Args:
        count: number of independent matrices (e.g. one per channel).
        initial: (size, size) or (count, size, size) orthogonal initial matrices.
        method: ``"exp"`` or ``"cayley"``.
        learnable: whether the skew-symmetric parameter exists.
    """

    def __init__(self, count: int, initial: torch.Tensor, method: str = "cayley", learnable: bool = True):
        super().__init__()
        if method not in ORTHOGONAL_METHODS:
            raise ValueError(f"orthogonal method must be one of {ORTHOGONAL_METHODS}, got {method!r}")
        size = initial.shape[-1]
        if initial.dim() == 3 and initial.shape[0] not in (1, count):
            raise ValueError(
                f"need {count} initial ({size}, {size}) matrices (one per channel), got {initial.shape[0]}"
            )
        # float64, cast at use: a float32 copy would not be orthogonal to float64 precision.
        initial = initial.to(torch.float64).expand(count, size, size).clone()
        self.method = method
        self._once: dict | None = None  #: matrices per dtype while ``matrices_computed_once`` holds, else None
        self.register_buffer("initial", initial)
        if learnable:
            self.weight = nn.Parameter(torch.zeros(count, size, size))
        else:
            self.register_parameter("weight", None)

    def forward(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The matrices: (count, size, size), in ``dtype`` (default: the parameter's)."""
        if self.weight is None:
            return self.initial.to(dtype or self.initial.dtype)
        if self._once is not None and not torch.is_grad_enabled():
            if dtype not in self._once:
                self._once[dtype] = self._compute(dtype)
            return self._once[dtype]
        return self._compute(dtype)

    def _compute(self, dtype: torch.dtype | None) -> torch.Tensor:
        # Computed in the wider of the parameter's and the requested dtype: float64 activations need
        # matrices orthogonal to float64 precision.
        compute = self.weight.dtype if dtype is None else torch.promote_types(self.weight.dtype, dtype)
        if compute in (torch.float16, torch.bfloat16):  # no half-precision matrix_exp / solve
            compute = torch.float32
        rotation = orthogonal_from_skew(skew_symmetric(self.weight.to(compute)), self.method)
        return (rotation @ self.initial.to(compute)).to(dtype or self.weight.dtype)


@contextlib.contextmanager
def matrices_computed_once(network: nn.Module) -> Iterator[None]:
    """Within it, while grad is disabled, each learnable ``OrthogonalMatrices`` of ``network`` computes its
    matrices once per dtype and reuses them (a Cayley solve or matrix exponential per layer and forward
    otherwise): the same values, so the same outputs, for inference over many windows. With grad enabled,
    and after the block, they are computed at every call as before (the parameters may change)."""
    layers = [module for module in network.modules() if isinstance(module, OrthogonalMatrices)]
    for layer in layers:
        layer._once = {}
    try:
        yield
    finally:
        for layer in layers:
            layer._once = None
