"""The channel mixing's layouts: every memory format gives the same product, in that format."""

import pytest
import torch

from iunet3d.models.channel_mixing import InvertibleChannelMixing, mix_channels
from tests.helpers.tensors import randomise_parameters, relative_error

LAYOUTS = {
    "channels-last-3d": (torch.channels_last_3d, (2, 6, 3, 4, 5)),
    "channels-last-2d": (torch.channels_last, (2, 6, 4, 5)),
}


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_channels_last_mixing_equals_the_contiguous_product(layout):
    memory_format, shape = LAYOUTS[layout]
    x = torch.randn(shape, dtype=torch.float64)
    matrix = torch.randn(shape[1], shape[1], dtype=torch.float64)
    expected = torch.einsum("ij,bj...->bi...", matrix, x)
    got = mix_channels(x.contiguous(memory_format=memory_format), matrix)
    assert got.is_contiguous(memory_format=memory_format)
    assert relative_error(got, expected) < 1e-12
    strided = x.transpose(-1, -2)  # neither channels-first nor channels-last: the product over the last axis
    assert relative_error(mix_channels(strided, matrix), expected.transpose(-1, -2)) < 1e-12


def test_channels_last_layer_inverts_and_differentiates():
    layer = InvertibleChannelMixing(6, dim=3).double()
    randomise_parameters(layer)
    x = torch.randn(2, 6, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        assert relative_error(layer.inverse(layer(x)), x) < 1e-12
    x.requires_grad_()
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5, rtol=1e-4)
