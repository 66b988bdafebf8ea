"""The seed library's constructor API: keywords, validation, channel arithmetic and layouts."""

import pytest
import torch

from iunet3d import iUNet
from tests.helpers.tensors import expect_warning

SEED_LAYOUT_2D = """\
64-64-(32/32)---------------------------------------------------------(32/32)-64-64
---------128-128-(64/64)----------------------------------(64/64)-128-128----------
---------------------256-256-(128/128)-------(128/128)-256-256---------------------
---------------------------------512-512--512-512----------------------------------"""

SEED_LAYOUT_3D = """\
7-7-(5/2)-------------------------------------------------(5/2)-7-7
------16-16-16-(12/4)------------------------(12/4)-16-16-16-------
------------------32-(24/8)------------(24/8)-32-------------------
------------------------64-64-64--64-64-64-------------------------"""

TUTORIAL_LAYOUT = """\
3-3-3-3-(1/2)----------------------------------------------------------------------------------------------------(1/2)-3-3-3-3
----------8-8-8-8-(4/4)-------------------------------------------------------------------------------(4/4)-8-8-8-8-----------
---------------------16-16-16-16-(8/8)--------------------------------------------------(8/8)-16-16-16-16---------------------
-----------------------------------32-32-32-32-(16/16)-----------------(16/16)-32-32-32-32------------------------------------
---------------------------------------------------64-64-64-64--64-64-64-64---------------------------------------------------"""


def test_seed_readme_simple_2d_layout(capsys):
    model = iUNet(in_channels=64, architecture=[2, 2, 2, 2], dim=2)
    model.print_layout()
    assert capsys.readouterr().out == SEED_LAYOUT_2D + "\n"
    assert model.channels == [64, 128, 256, 512]
    assert model.skipped_channels == [32, 64, 128]
    assert model.channels_before_downsampling == [32, 64, 128]
    assert model.downsampling_factors == (8, 8)


def test_seed_readme_customised_3d_example_runs_with_changed_import(capsys):
    from iunet3d.layers import create_standard_module

    model = iUNet(
        in_channels=7, dim=3, architecture=[2, 3, 1, 3], create_module_fn=create_standard_module,
        module_kwargs={"block_depth": 3}, slice_mode="double", resampling_stride=2, learnable_resampling=True,
        resampling_init="haar", resampling_method="cayley", disable_custom_gradient=False,
        revert_input_padding=True, padding_mode="reflect", verbose=1,
    )  # fmt: skip
    model.print_layout()
    assert capsys.readouterr().out == SEED_LAYOUT_3D + "\n"
    assert model.channels == [7, 16, 32, 64]
    assert model.skipped_channels == [5, 12, 24]
    assert model.channels_before_downsampling == [2, 4, 8]
    assert model.downsampling_factors == (8, 8, 8)
    with expect_warning("padded"):
        y = model(torch.randn(1, 7, 9, 10, 11))
    assert y.shape == (1, 7, 9, 10, 11)


def test_seed_tutorial_layout():
    assert iUNet(in_channels=3, dim=2, architecture=(4, 4, 4, 4, 4)).layout() == TUTORIAL_LAYOUT


def test_anisotropic_per_level_strides():
    model = iUNet(16, [1, 1, 1, 1], dim=3, resampling_stride=[(1, 2, 2), (1, 2, 2), 2])
    assert model.resampling_stride == [(1, 2, 2), (1, 2, 2), (2, 2, 2)]
    assert model.downsampling_factors == (2, 8, 8)
    # k = floor(16 * (4 - 2) / 4) = 8, d = 8, C1 = 4 * 8 = 32; then 16/16 -> 64; then 48/16 -> 128
    assert model.channels == [16, 32, 64, 128]
    assert model.skipped_channels == [8, 16, 48]


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="resampling_strides"):
        iUNet(in_channels=4, architecture=[1, 1], dim=2, resampling_strides=2)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(resampling_stride=(1, 2)), "resampling_stride"),
        (dict(resampling_stride=[2, 2, 2]), "resampling_stride"),
        (dict(resampling_stride=(1, 1, 1)), "resampling_stride"),
        (dict(resampling_stride=0), "resampling_stride"),
        (dict(architecture=[2, 0, 1]), "architecture"),
        (dict(architecture=[]), "architecture"),
        (dict(dim=4), "dim"),
        (dict(in_channels=1), "in_channels"),
        (dict(slice_mode="triple"), "slice_mode"),
        (dict(resampling_method="householder"), "resampling_method"),
        (dict(channel_mixing_method="qr"), "channel_mixing_method"),
        (dict(resampling_init="random"), "resampling_init"),
        (dict(resampling_init=torch.ones(8, 8)), "resampling_init"),
        (dict(padding_mode="mirror"), "padding_mode"),
        (dict(channel_mixing_freq=-2), "channel_mixing_freq"),
        (dict(dim=3.0), "dim"),
        (dict(dim=True), "dim"),
        (dict(resampling_init=torch.eye(8).expand(3, 8, 8)), "resampling_init"),
        (dict(module_kwargs={"num_groups": 0}), "num_groups"),
    ],
)
def test_invalid_values_name_the_argument(kwargs, argument):
    config = dict(in_channels=8, architecture=[1, 1], dim=3) | kwargs
    with pytest.raises(ValueError, match=argument):
        iUNet(**config)


def test_module_kwargs_reach_the_coupling_function():
    model = iUNet(4, [1, 1], dim=2, module_kwargs={"block_depth": 3, "norm": "instance"})
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert len(convs) == 4 * 3 and len(norms) == 4 * 2
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    with pytest.raises(TypeError, match="block_dept"):
        iUNet(4, [1, 1], dim=2, module_kwargs={"block_dept": 3})


def test_explicit_tensor_resampling_init():
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    model = iUNet(4, [1, 1], dim=2, resampling_init=q, learnable_resampling=False)
    down = model.splits[0].downsampling
    assert torch.allclose(down.matrices()[0], q)
    resampling = [n for n, _ in model.named_parameters() if n.startswith(("splits", "merges"))]
    assert resampling == []
    assert any("matrices" in n for n, _ in model.named_parameters())  # channel mixing stays learnable


def test_channel_mixing_options():
    def count(model):
        from iunet3d.layers import InvertibleChannelMixing

        return sum(isinstance(m, InvertibleChannelMixing) for m in model.modules())

    assert count(iUNet(4, [2, 2, 2], dim=2)) == 4  # one per level with a split, on each side
    assert count(iUNet(4, [2, 2, 2], dim=2, channel_mixing_freq=1)) == 12
    assert count(iUNet(4, [2, 2, 2], dim=2, channel_mixing_freq=2)) == 6
    assert count(iUNet(4, [2, 2, 2], dim=2, channel_mixing_freq=0)) == 0
    assert count(iUNet(4, [2, 2, 2], dim=2, learnable_channel_mixing=False)) == 0


def test_batch_norm_is_possible_but_warns():
    from tests.helpers.tensors import expect_warning

    with expect_warning("three times per step"):
        model = iUNet(4, [1, 1], dim=2, module_kwargs={"norm": "batch"})
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_create_module_fn_gets_the_original_librarys_context():
    from iunet3d.layers import create_standard_module

    seen = []

    def create(in_channels, **kwargs):
        seen.append((kwargs["LR"], kwargs["level"], kwargs["module_index"], kwargs["architecture"], kwargs["dim"]))
        return create_standard_module(in_channels, **kwargs)

    iUNet(4, [2, 1], dim=2, create_module_fn=create)
    assert sorted(seen) == sorted(
        [("L", 0, 0, (2, 1), 2), ("L", 0, 1, (2, 1), 2), ("L", 1, 0, (2, 1), 2),
         ("R", 0, 0, (2, 1), 2), ("R", 0, 1, (2, 1), 2), ("R", 1, 0, (2, 1), 2)]
    )  # fmt: skip


def test_numpy_and_nearly_orthogonal_resampling_init_give_exact_float64_inverse():
    import numpy as np

    from tests.helpers.tensors import relative_error

    q32, _ = torch.linalg.qr(torch.randn(4, 4))  # float32: orthogonal only to ~1e-7
    for init in (q32, q32.numpy().astype(np.float32)):
        model = iUNet(4, [1, 1], dim=2, resampling_init=init).double()
        x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
        with torch.no_grad():
            assert relative_error(model.inverse(model(x)), x) < 1e-12


def test_fixed_dimension_layers_default_to_stride_two():
    from iunet3d.layers import InvertibleDownsampling1D, InvertibleDownsampling3D, InvertibleUpsampling2D

    assert InvertibleDownsampling3D(4).stride == (2, 2, 2)
    assert InvertibleDownsampling1D(4).stride == (2,)
    assert InvertibleUpsampling2D(8).channels == 2
    with pytest.raises(ValueError, match="stride"):
        InvertibleDownsampling3D(4, (2, 2))
