"""The whole iUNet: invertibility, padding, reversible == conventional gradients (both engines), memcnn defects."""

import warnings

import pytest
import torch
from torch import nn

from iunet3d import iUNet
from tests.helpers.tensors import expect_warning, randomise_parameters, relative_error

CONFIGS = {
    "1d": dict(in_channels=4, architecture=[2, 1, 2], dim=1, resampling_stride=[2, 4]),
    "2d-aniso": dict(in_channels=4, architecture=[1, 2, 1], dim=2, resampling_stride=[(1, 2), (2, 2)]),
    "3d-aniso": dict(in_channels=4, architecture=[2, 1, 1], dim=3, resampling_stride=[(1, 2, 2), 2]),
    "3d-mixing-every-coupling": dict(in_channels=6, architecture=[2, 2], dim=3, channel_mixing_freq=1,
                                     resampling_method="exp", slice_mode="constant"),
}  # fmt: skip
DIVISIBLE = {"1d": (16,), "2d-aniso": (4, 8), "3d-aniso": (4, 8, 8), "3d-mixing-every-coupling": (4, 4, 4)}
ODD = {"1d": (13,), "2d-aniso": (5, 7), "3d-aniso": (3, 9, 6), "3d-mixing-every-coupling": (3, 5, 2)}


ENGINES = ("fused", "memcnn")


def _pair(config, engine="fused", **overrides):
    """A reversible model and a conventional one with identical random float64 weights."""
    reversible = iUNet(**config, **overrides, reversible_engine=engine).double()
    randomise_parameters(reversible, scale=0.2)
    conventional = iUNet(**config, **overrides, disable_custom_gradient=True).double()
    conventional.load_state_dict(reversible.state_dict())
    return reversible, conventional


def _input(config, spatial, batch=2):
    return torch.randn(batch, config["in_channels"], *spatial, dtype=torch.float64)


@pytest.mark.parametrize("name", CONFIGS)
def test_fresh_iunet_is_identity(name):
    config = CONFIGS[name]
    model = iUNet(**config).double()
    x = _input(config, DIVISIBLE[name])
    with torch.no_grad():
        assert relative_error(model(x), x) < 1e-12


@pytest.mark.parametrize("name", CONFIGS)
def test_inverse_of_forward_at_random_weights(name):
    config = CONFIGS[name]
    model, _ = _pair(config)
    x = _input(config, DIVISIBLE[name])
    with torch.no_grad():
        y = model(x)
        assert relative_error(y, x) > 1e-3  # the network is not trivially the identity
        assert relative_error(model.inverse(y), x) < 1e-10


@pytest.mark.parametrize("name", CONFIGS)
def test_odd_sizes_are_padded_and_cropped_back(name):
    config = CONFIGS[name]
    model, conventional = _pair(config, verbose=0)
    x = _input(config, ODD[name])
    with torch.no_grad():
        y = model(x)
        assert y.shape == x.shape
        assert torch.equal(y, conventional(x))
    uncropped = iUNet(**config, revert_input_padding=False, verbose=0).double()
    with torch.no_grad():
        padded = uncropped(x)
    assert all(s % f == 0 for s, f in zip(padded.shape[2:], uncropped.downsampling_factors, strict=True))
    assert all(p >= s for p, s in zip(padded.shape[2:], x.shape[2:], strict=True))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("sizes", ["divisible", "odd"])
def test_reversible_gradients_equal_conventional(name, sizes, engine):
    config = CONFIGS[name]
    reversible, conventional = _pair(config, engine, verbose=0)
    spatial = DIVISIBLE[name] if sizes == "divisible" else ODD[name]
    x = _input(config, spatial)
    target = torch.randn_like(x)
    grads = []
    for model in (reversible, conventional):
        leaf = x.clone().requires_grad_()  # a leaf input: memcnn alone would double its gradient
        loss = ((model(leaf) - target) ** 2).sum()
        loss.backward()
        grads.append([leaf.grad] + [p.grad for p in model.parameters()])
        assert leaf.untyped_storage().nbytes() == leaf.numel() * leaf.element_size()
        assert torch.equal(leaf.detach(), x)
    assert len(grads[0]) > 1
    for got, expected in zip(*grads, strict=True):
        assert relative_error(got, expected) < 1e-10


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("padding_mode", [None, "constant"])
def test_callers_input_is_never_freed_or_changed(padding_mode, engine):
    config = CONFIGS["3d-aniso"]
    model, _ = _pair(config, engine, padding_mode=padding_mode)
    x = _input(config, DIVISIBLE["3d-aniso"])
    x_copy = x.clone()
    source = x.clone().requires_grad_()
    nonleaf_requiring_grad = source * 1.0
    view = x.clone()[:, :, ...]
    for tensor in (x, nonleaf_requiring_grad, view):
        model(tensor).sum().backward()
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        assert torch.equal(tensor.detach(), x_copy)
    assert source.grad is not None and source.grad.abs().sum() > 0
    with torch.no_grad():
        model(x)
        model.inverse(x)
    assert torch.equal(x, x_copy)


@pytest.mark.parametrize("engine", ENGINES)
def test_encode_decode_match_forward_and_keep_codes(engine):
    config = CONFIGS["3d-aniso"]
    model, _ = _pair(config, engine)
    x = _input(config, DIVISIBLE["3d-aniso"])
    codes = model.encode(x)
    assert [c.shape[1] for c in codes] == model.skipped_channels + [model.channels[-1]]
    saved = [c.detach().clone() for c in codes]
    y = model.decode(*codes)
    y.sum().backward()
    for code, copy in zip(codes, saved, strict=True):
        assert torch.equal(code.detach(), copy)
    with torch.no_grad():
        assert relative_error(y.detach(), model(x)) < 1e-12
        assert relative_error(model.decode(codes), model(x)) < 1e-12
    for code, copy in zip(codes, saved, strict=True):  # decode under no_grad keeps them too
        assert torch.equal(code.detach(), copy)


@pytest.mark.parametrize("engine", ENGINES)
def test_relu_before_iunet_in_callers_network(engine):
    """An op that saves its output (ReLU) directly before a reversible block breaks plain memcnn."""
    torch.manual_seed(0)
    config = dict(in_channels=4, architecture=[2, 2], dim=2)
    reversible, conventional = _pair(config, engine)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    grads = []
    for model in (reversible, conventional):
        leaf = x.clone().requires_grad_()
        model(torch.relu(leaf)).square().sum().backward()
        grads.append(leaf.grad)
    assert relative_error(grads[0], grads[1]) < 1e-10


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("optimizer_type", [torch.optim.SGD, torch.optim.Adam])
def test_iunet_as_subnetwork_trains(optimizer_type, engine):
    """The seed tutorial's segmentation pattern: Conv3d -> iUNet -> Conv3d, with a ReLU before the
    iUNet. Its gradients equal those of the same network with conventional backprop, and it trains."""

    def network(disable_custom_gradient):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv3d(1, 8, 3, padding=1), nn.ReLU(),
            iUNet(8, (1, 1, 1), dim=3, resampling_stride=[(1, 2, 2), 2],
                  disable_custom_gradient=disable_custom_gradient, reversible_engine=engine),
            nn.Conv3d(8, 3, 3, padding=1),
        )  # fmt: skip

    x = torch.randn(2, 1, 4, 8, 8)
    labels = (x[:, 0] > 0.5).long() + (x[:, 0] > 1.0).long()
    model, reference = network(False), network(True)
    for m in (model, reference):
        nn.functional.cross_entropy(m(x), labels).backward()
    for p_reversible, p_conventional in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p_reversible.grad, p_conventional.grad, rtol=1e-4, atol=1e-7)

    optimizer = optimizer_type(model.parameters(), lr=0.01 if optimizer_type is torch.optim.Adam else 0.1)
    iunet_start = [p.detach().clone() for p in model[2].parameters()]
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    moved = [not torch.equal(p, p0) for p, p0 in zip(model[2].parameters(), iunet_start, strict=True)]
    assert sum(moved) > len(moved) // 2  # the iUNet itself is trained, not only the convolutions


@pytest.mark.parametrize("requires_grad", [False, True])
def test_in_place_change_of_the_input_before_backward_is_an_error_under_memcnn(requires_grad):
    """memcnn recomputes from the input it kept, so a changed input would give wrong gradients."""
    model = iUNet(4, (1, 1), dim=2, reversible_engine="memcnn")
    source = torch.randn(1, 4, 8, 8, requires_grad=requires_grad)
    x = source * 1.0 if requires_grad else source  # a non-leaf requiring grad, or a plain tensor
    y = model(x)
    with torch.no_grad():
        x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.square().sum().backward()


def test_in_place_change_of_the_input_after_forward_leaves_fused_gradients_right():
    """The fused engine reconstructs the input from the output and never reads the caller's tensor."""
    model, _ = _pair(dict(in_channels=4, architecture=[1, 1], dim=2))
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    model(x).square().sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    changed = x.clone()
    y = model(changed)
    with torch.no_grad():
        changed.add_(1.0)
    y.square().sum().backward()
    for parameter, reference in zip(model.parameters(), expected, strict=True):
        assert relative_error(parameter.grad, reference) < 1e-10


@pytest.mark.parametrize("engine", ENGINES)
def test_outputs_carry_no_stray_grad(engine):
    model = iUNet(4, (1, 1), dim=2, reversible_engine=engine)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    y = model(x)
    codes = model.encode(x)
    (y.sum() + sum(c.sum() for c in codes)).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reading .grad of a non-leaf warns
        assert y.grad is None and all(c.grad is None for c in codes)


def test_low_precision_models_run():
    model = iUNet(4, (1, 1), dim=2).to(torch.bfloat16)
    y = model(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_no_warning_and_no_copy_when_no_padding_needed():
    from iunet3d.models.padding import pad_to_multiple

    x = torch.randn(1, 4, 8, 8)
    padded, amounts = pad_to_multiple(x, (4, 4), "constant", 0)
    assert padded is x and amounts == [(0, 0), (0, 0)]
    model = iUNet(4, (1, 1, 1), dim=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x).sum().backward()
        with torch.no_grad():
            model.inverse(x)
    with expect_warning("padded"):
        model(torch.randn(1, 4, 7, 8))


def test_padding_mode_none_requires_divisible_sizes():
    model = iUNet(4, (1, 1), dim=2, padding_mode=None)
    with pytest.raises(ValueError, match="not divisible"):
        model(torch.randn(1, 4, 7, 8))


def test_wrong_input_shape_is_a_clear_error():
    model = iUNet(4, (1, 1), dim=3)
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 4, S, S, S\)"):
        model(torch.randn(1, 3, 8, 8, 8))


@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
def test_padding_larger_than_the_input_is_a_clear_error(padding_mode):
    model = iUNet(2, (1, 1, 1), dim=3, padding_mode=padding_mode, verbose=0)
    with pytest.raises(ValueError, match=f"padding_mode='{padding_mode}' cannot pad"):
        model(torch.randn(1, 2, 1, 4, 4))


@pytest.mark.parametrize("padding_mode", ["constant", "reflect", "replicate", "circular"])
def test_padding_modes(padding_mode):
    model = iUNet(2, (1, 1), dim=3, padding_mode=padding_mode, padding_value=-3.0, verbose=0)
    x = torch.randn(1, 2, 5, 6, 7)
    with torch.no_grad():
        assert torch.allclose(model(x), x, atol=1e-6)  # identity at init, cropped back
    raw = iUNet(2, (1, 1), dim=3, padding_mode=padding_mode, padding_value=-3.0, verbose=0,
                revert_input_padding=False)  # fmt: skip
    with torch.no_grad():
        padded = raw(x)
    assert padded.shape[2:] == (6, 6, 8)
    if padding_mode == "constant":
        assert torch.allclose(padded[0, :, -1], torch.full_like(padded[0, :, -1], -3.0), atol=1e-6)


@pytest.mark.slow
def test_tutorial_mirror_toy_problem_learns():
    """Seed tutorial 1: train an iUNet to mirror images (here smooth random ones, not CIFAR)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = iUNet(in_channels=2, dim=2, architecture=(2, 2, 2, 2, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        coarse = torch.rand(16, 2, 4, 4, generator=generator)
        x = nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=True)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), torch.flip(x, (3,)))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < losses[0] / 2


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("sizes", ["divisible", "odd"])
def test_inference_pass_equals_the_recorded_forward(name, sizes):
    """Without gradients the blocks update activations in place and share skips (``InferencePass``): the
    same outputs as a forward with autograd, the caller's input untouched, and with ``reuse_input`` the
    same outputs again."""
    config = CONFIGS[name]
    model, conventional = _pair(config)
    x = _input(config, (DIVISIBLE if sizes == "divisible" else ODD)[name])
    x_copy = x.clone()
    expected = conventional(x.clone().requires_grad_()).detach()
    with torch.no_grad():
        inferred = model(x)
        assert torch.equal(x, x_copy)
        reused = model(x.clone(), reuse_input=True)
    assert relative_error(inferred, expected) < 1e-12
    assert torch.equal(reused, inferred)


def test_inference_in_channels_last_matches_contiguous():
    config = CONFIGS["3d-aniso"]
    model, _ = _pair(config)
    x = _input(config, DIVISIBLE["3d-aniso"])
    with torch.no_grad():
        expected = model(x)
        model.to(memory_format=torch.channels_last_3d)
        got = model(x.contiguous(memory_format=torch.channels_last_3d))
    assert relative_error(got, expected) < 1e-12
