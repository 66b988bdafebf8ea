"""Orthogonal parametrisations and Haar initialisation for anisotropic strides."""

import math

import pytest
import torch

from iunet3d.models.orthogonal import ORTHOGONAL_METHODS, haar_matrix, is_orthogonal, orthogonal_from_skew
from iunet3d.models.resampling import InvertibleDownsampling

H2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2)


@pytest.mark.parametrize("method", ORTHOGONAL_METHODS)
def test_skew_maps_to_orthogonal_with_unit_determinant(method):
    weight = torch.randn(3, 6, 6, dtype=torch.float64)
    q = orthogonal_from_skew(weight - weight.transpose(-1, -2), method)
    assert is_orthogonal(q, 1e-12)
    assert torch.allclose(torch.linalg.det(q), torch.ones(3, dtype=torch.float64))
    assert torch.equal(orthogonal_from_skew(torch.zeros(4, 4), method), torch.eye(4))


@pytest.mark.parametrize(
    ("stride", "expected"),
    [
        ((2, 2, 2), torch.kron(torch.kron(H2, H2), H2)),
        ((1, 2, 2), torch.kron(H2, H2)),
        ((2, 1, 2), torch.kron(torch.kron(H2, torch.eye(1, dtype=torch.float64)), H2)),
        ((2, 1), H2),
        ((1, 1, 2), H2),
    ],
)
def test_haar_for_every_stride_of_ones_and_twos(stride, expected):
    assert torch.allclose(haar_matrix(stride), expected, atol=1e-15)


def test_haar_first_channel_is_the_block_mean_for_anisotropic_stride():
    down = InvertibleDownsampling(1, (1, 2, 2)).double()
    x = torch.randn(1, 1, 3, 4, 6, dtype=torch.float64)
    y = down(x)
    block_mean = torch.nn.functional.avg_pool3d(x, (1, 2, 2))
    assert torch.allclose(y[:, :1], block_mean * 2, atol=1e-12)  # sqrt(m) * mean, m = 4
    # the other three channels are the Haar details: along W, along H, and diagonal
    detail_w = (x[..., ::2, ::2] - x[..., ::2, 1::2] + x[..., 1::2, ::2] - x[..., 1::2, 1::2]) / 2
    assert torch.allclose(y[:, 1:2], detail_w, atol=1e-12)


def test_stride_three_uses_orthonormal_dct():
    matrix = haar_matrix((3,))
    assert is_orthogonal(matrix, 1e-12)
    assert torch.allclose(matrix[0], torch.full((3,), 1 / math.sqrt(3), dtype=torch.float64))
