"""The fused reversible engine: every invertible layer through it, and the whole iUNet against plain
autograd and memcnn (float64), autograd.grad, memory, autocast, randomness, state dicts."""

import gc
import weakref

import pytest
import torch
from torch import nn

from iunet3d import iUNet
from iunet3d.models.coupling import AdditiveCoupling
from iunet3d.models.engines import FusedPass, MemcnnPass, PlainPass
from iunet3d.models.registry import layer_examples
from iunet3d.models.reversible_engine import reverse
from tests.helpers.tensors import randomise_parameters, relative_error

EXAMPLES = layer_examples()
PASSES = {
    "fused": lambda layer: FusedPass(),
    "memcnn": lambda layer: MemcnnPass({}, (layer, layer)),  # the layer keeps the caller's input
    "plain": lambda layer: PlainPass(),
}


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def _layer_and_inputs(example, method="cayley"):
    layer = example.build(method).double()
    randomise_parameters(layer)
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(shape, dtype=torch.float64, generator=generator) for shape in example.input_shapes)
    return layer, inputs


def _layer_gradients(example, engine):
    """Gradients of a fixed loss of one layer's outputs w.r.t. its inputs and parameters."""
    layer, inputs = _layer_and_inputs(example)
    leaves = tuple(x.clone().requires_grad_() for x in inputs)
    # memcnn would double a leaf's gradient (it sets .grad and returns it): it only sees an alias
    arguments = tuple(x.view_as(x) for x in leaves) if engine == "memcnn" else leaves
    outputs = _as_tuple(PASSES[engine](layer)(layer, *arguments))
    weights = [torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape) for y in outputs]
    sum((y * w).sum() for y, w in zip(outputs, weights, strict=True)).backward()
    return [x.grad for x in leaves] + [p.grad for p in layer.parameters()], outputs


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_every_layer_through_the_engine_has_the_gradients_of_plain_autograd_and_memcnn(example):
    plain, plain_outputs = _layer_gradients(example, "plain")
    assert all(g is not None and g.abs().sum() > 0 for g in plain)
    for engine in ("fused", "memcnn"):
        grads, outputs = _layer_gradients(example, engine)
        for output, expected in zip(outputs, plain_outputs, strict=True):
            assert relative_error(output.detach(), expected.detach()) < 1e-13  # forward is the layer's own
        for got, expected in zip(grads, plain, strict=True):
            assert relative_error(got, expected) < 1e-10, engine


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_every_layer_through_the_engine_passes_gradcheck(example):
    layer, inputs = _layer_and_inputs(example)
    inputs = tuple(x.requires_grad_() for x in inputs)

    def through_engine(*tensors):
        return FusedPass()(layer, *tensors[: len(inputs)])

    assert torch.autograd.gradcheck(through_engine, inputs + tuple(layer.parameters()), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_reverse_reconstructs_the_inputs_and_recomputes_the_outputs(example):
    layer, inputs = _layer_and_inputs(example)
    with torch.no_grad():
        outputs = _as_tuple(layer(*inputs))
    reversal = reverse(layer, list(outputs))
    assert len(reversal.inputs) == len(inputs) and len(reversal.outputs) == len(outputs)
    for pieces, x in zip(reversal.inputs, inputs, strict=True):
        assert all(piece.requires_grad and piece.is_leaf for piece in pieces)
        assert relative_error(torch.cat(pieces, dim=1).detach(), x) < 1e-12
    for pieces, y in zip(reversal.outputs, outputs, strict=True):
        assert relative_error(torch.cat(pieces, dim=1).detach(), y) < 1e-12


CONFIG = dict(in_channels=4, architecture=[2, 1, 2], dim=3, resampling_stride=[(1, 2, 2), 2])


def _models(config=CONFIG, **overrides):
    """The same random float64 weights under the fused engine, memcnn and plain autograd."""
    fused = iUNet(**config, **overrides).double()
    randomise_parameters(fused, scale=0.2)
    memcnn = iUNet(**config, **overrides, reversible_engine="memcnn").double()
    plain = iUNet(**config, **overrides, disable_custom_gradient=True).double()
    for model in (memcnn, plain):
        model.load_state_dict(fused.state_dict())
    return {"fused": fused, "memcnn": memcnn, "plain": plain}


def test_the_state_dict_is_the_same_for_every_engine_and_old_memcnn_checkpoints_load():
    models = _models()
    keys = [list(model.state_dict()) for model in models.values()]
    assert keys[0] == keys[1] == keys[2]
    old_style = {}  # before the engines existed, every block sat inside memcnn's wrapper as ``_fn``
    for key, value in models["fused"].state_dict().items():
        parts = key.split(".")
        if parts[0] in ("encoder_levels", "decoder_levels"):
            parts.insert(3, "_fn")
        elif parts[0] in ("splits", "merges"):
            parts.insert(2, "_fn")
        old_style[".".join(parts)] = value
    assert any("._fn." in key for key in old_style)
    restored = iUNet(**CONFIG).double()
    restored.load_state_dict(old_style)
    for (name, value), expected in zip(restored.state_dict().items(), models["fused"].state_dict().values(),
                                       strict=True):  # fmt: skip
        assert torch.equal(value, expected), name


def test_the_engine_is_a_validated_attribute_that_can_be_switched():
    model = iUNet(**CONFIG)
    assert model.reversible_engine == "fused"
    model.reversible_engine = "memcnn"
    assert model.reversible_engine == "memcnn"
    with pytest.raises(ValueError, match="reversible_engine must be one of"):
        model.reversible_engine = "revlib"
    with pytest.raises(ValueError, match="reversible_engine must be one of"):
        iUNet(**CONFIG, reversible_engine="checkpoint")


def test_whole_iunet_passes_gradcheck_through_the_fused_engine():
    model = iUNet(2, (1, 1), dim=1, module_kwargs=dict(block_depth=2, norm=None)).double()
    randomise_parameters(model, scale=0.4)
    x = torch.randn(1, 2, 8, dtype=torch.float64, requires_grad=True)
    parameters = tuple(model.parameters())
    assert sum(p.numel() for p in parameters) > 20
    assert torch.autograd.gradcheck(lambda *args: model(args[0]), (x, *parameters), eps=1e-6, atol=1e-5)


def test_autograd_grad_through_the_iunet_equals_plain_autograd():
    models = _models()
    x = torch.randn(2, 4, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    results = {}
    for name in ("fused", "plain"):
        model = models[name]
        loss = model(x).sin().sum()
        results[name] = torch.autograd.grad(loss, [x, *model.parameters()])
        assert all(p.grad is None for p in model.parameters())  # grad() accumulates nothing
    assert x.grad is None
    for got, expected in zip(results["fused"], results["plain"], strict=True):
        assert relative_error(got, expected) < 1e-10


def test_a_second_backward_through_the_same_graph_gives_the_same_gradients():
    model = _models()["fused"]
    x = torch.randn(1, 4, 4, 8, 8, dtype=torch.float64)
    loss = model(x).square().sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.parameters()]
    loss.backward()
    for parameter, once in zip(model.parameters(), first, strict=True):
        assert relative_error(parameter.grad, 2 * once) < 1e-12


def test_double_backward_is_refused_with_a_clear_error():
    model = _models()["fused"]
    x = torch.randn(1, 4, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        grad.sum().backward()


def test_no_block_keeps_its_input_after_forward():
    """Activation memory flat in depth: after forward, no tensor between blocks is alive (plain autograd
    keeps them all); only the caller's input and the output remain."""
    for engine, expect_alive in (("fused", False), ("plain", True)):
        model = _models()[engine]
        seen = []

        def remember(module, args, seen=seen):
            seen.extend(weakref.ref(a) for a in args)

        hooks = [module.register_forward_pre_hook(remember)
                 for module in model.modules() if hasattr(module, "inverse") and module is not model]  # fmt: skip
        x = torch.randn(1, 4, 4, 8, 8, dtype=torch.float64, requires_grad=True)
        y = model(x)
        gc.collect()
        intermediates = [ref for ref in seen if ref() is not x]
        assert len(intermediates) > 10
        alive = [ref for ref in intermediates if ref() is not None]
        assert bool(alive) == expect_alive, (engine, len(alive))
        y.sum().backward()
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("used", ["skip", "bottom"])
def test_backward_from_some_of_the_codes_of_encode(used):
    models = _models()
    x = torch.randn(2, 4, 4, 8, 8, dtype=torch.float64)
    grads = {}
    for name in ("fused", "plain"):
        leaf = x.clone().requires_grad_()
        codes = models[name].encode(leaf)
        (codes[0] if used == "skip" else codes[-1]).square().sum().backward()
        grads[name] = [leaf.grad] + [torch.zeros_like(p) if p.grad is None else p.grad
                                     for p in models[name].parameters()]  # fmt: skip
    nonzero = {name: sum(bool(g.abs().sum() > 0) for g in grads[name]) for name in grads}
    assert nonzero["fused"] == nonzero["plain"] > 1  # the layers the loss does not depend on get zero
    for got, expected in zip(grads["fused"], grads["plain"], strict=True):
        assert relative_error(got, expected) < 1e-10


def test_an_output_changed_in_place_before_backward_is_an_error():
    model = _models()["fused"]
    y = model(torch.randn(1, 4, 4, 8, 8, dtype=torch.float64))
    loss = y.square().sum()
    with torch.no_grad():
        y.mul_(2)
    with pytest.raises(RuntimeError, match="modified"):
        loss.backward()


class _DropoutFunction(nn.Module):
    """A coupling function that draws random numbers (dropout) in training mode."""

    def __init__(self, channels_in, channels_out):
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        return self.conv(self.dropout(x))


def _dropout_coupling(channels, module_index, **_):
    half = channels // 2
    return AdditiveCoupling(_DropoutFunction(half, channels - half), half, update_second=module_index % 2 == 0)


def test_randomness_in_a_coupling_function_is_recomputed_identically():
    config = dict(in_channels=4, architecture=[2, 2], dim=2, create_module_fn=_dropout_coupling)
    models = _models(config)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    grads = {}
    for name in ("fused", "plain"):
        torch.manual_seed(7)  # the same dropout masks in both forward passes
        models[name](x).sin().sum().backward()
        grads[name] = [p.grad for p in models[name].parameters()]
    for got, expected in zip(grads["fused"], grads["plain"], strict=True):
        assert relative_error(got, expected) < 1e-10


def test_batch_norm_statistics_are_updated_once_per_step():
    config = dict(in_channels=4, architecture=[2, 2], dim=2, module_kwargs=dict(norm="batch"))
    with pytest.warns(UserWarning, match="batch"):
        models = _models(config)
    x = torch.randn(4, 4, 8, 8, dtype=torch.float64) * 3 + 1
    for name in ("fused", "plain"):
        models[name](x).square().sum().backward()
    for (name, got), expected in zip(models["fused"].named_buffers(), models["plain"].buffers(), strict=True):
        assert torch.allclose(got.double(), expected.double(), rtol=1e-10, atol=0), name
    tracked = [b for n, b in models["fused"].named_buffers() if n.endswith("num_batches_tracked")]
    assert tracked and all(int(b) == 1 for b in tracked)


class _PlainInvertible(nn.Module):
    """A custom invertible layer without ``reverse``: y = (a, b + tanh(conv(a)))."""

    def __init__(self, channels, **_):
        super().__init__()
        self.half = channels // 2
        self.conv = nn.Conv2d(self.half, channels - self.half, 3, padding=1)

    def forward(self, x):
        a, b = x[:, : self.half], x[:, self.half :]
        return torch.cat([a, b + torch.tanh(self.conv(a))], dim=1)

    def inverse(self, y):
        a, b = y[:, : self.half], y[:, self.half :]
        return torch.cat([a, b - torch.tanh(self.conv(a))], dim=1)


def test_a_custom_layer_without_reverse_is_inverted_and_recomputed():
    config = dict(in_channels=4, architecture=[2, 1], dim=2, create_module_fn=lambda c, **kw: _PlainInvertible(c))
    models = _models(config)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    grads = {}
    for name in ("fused", "plain"):
        models[name](x).sin().sum().backward()
        grads[name] = [p.grad for p in models[name].parameters()]
    for got, expected in zip(grads["fused"], grads["plain"], strict=True):
        assert relative_error(got, expected) < 1e-10


def test_the_inverse_direction_is_reversible_too():
    models = _models()
    y = torch.randn(2, 4, 4, 8, 8, dtype=torch.float64)
    grads = {}
    for name in ("fused", "plain"):
        leaf = y.clone().requires_grad_()
        models[name].inverse(leaf).cos().sum().backward()
        grads[name] = [leaf.grad] + [p.grad for p in models[name].parameters()]
    for got, expected in zip(grads["fused"], grads["plain"], strict=True):
        assert relative_error(got, expected) < 1e-10


def test_without_gradients_no_graph_is_built():
    model = _models()["fused"]
    x = torch.randn(1, 4, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        assert model(x).grad_fn is None
    frozen = iUNet(**CONFIG).requires_grad_(False)
    assert frozen(torch.randn(1, 4, 4, 8, 8)).grad_fn is None


# ----- mixed precision --------------------------------------------------------------------------------


def _bf16_pair(depth):
    """A depth-``depth`` iUNet with trained-looking weights, under the fused engine and plain autograd."""
    torch.manual_seed(0)
    fused = iUNet(8, [depth // 3] * 3, dim=3)
    with torch.no_grad():
        for module in fused.modules():
            if isinstance(module, nn.Conv3d):
                module.reset_parameters()  # no zero-initialised last convolution: F is far from 0
        for name, parameter in fused.named_parameters():
            if name.endswith("matrices.weight"):
                parameter.normal_(0, 0.05)
    plain = iUNet(8, [depth // 3] * 3, dim=3, disable_custom_gradient=True)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.mark.slow
def test_bf16_autocast_on_cpu_reconstructs_at_float32_accuracy_and_matches_plain_autograd():
    """Depth 30 (30 couplings per branch) under CPU bf16 autocast: the coupling functions run in bf16, the
    carried tensors are float64, the output is float32."""
    fused, plain = _bf16_pair(30)
    x = torch.randn(2, 8, 8, 16, 16)
    grads = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        error = fused.reconstruction_error(x)
        assert fused.encoder_levels[0][0].function[0](x[:, :4]).dtype == torch.bfloat16  # F runs in bf16
        for name, model in (("fused", fused), ("plain", plain)):
            leaf = x.clone().requires_grad_()
            y = model(leaf)
            assert y.dtype == torch.float32
            loss = (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum()
            loss.backward()
            grads[name] = [leaf.grad] + [p.grad for p in model.parameters()]
    assert error.total <= 1e-5 and max(error.levels) <= 1e-5
    assert len(grads["fused"]) > 100
    for got, expected in zip(grads["fused"], grads["plain"], strict=True):
        assert relative_error(got, expected) <= 1e-2
        assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) >= 0.999


def test_under_autocast_a_float32_carrier_would_lose_the_reconstruction():
    """Why the carried tensors are float64 under autocast: with float32 ones, bf16 rounding of the coupling
    functions' inputs flips for a few elements, and inverse(forward(x)) is off far beyond float32 level."""
    fused, _ = _bf16_pair(12)
    x = torch.randn(1, 8, 8, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused.reconstruction_error(x).total < 1e-12  # float64 carrier
        run = PlainPass()
        y = fused._decode(fused._encode(x, run), run)  # the same chain on a float32 carrier
        back = fused._inverse_encode(fused._inverse_decode(y, run), run)
    assert relative_error(back, x) > 1e-5


def test_float64_is_carried_only_when_backward_will_reconstruct():
    fused, _ = _bf16_pair(3)
    seen = []
    fused.encoder_levels[0][0].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    x = torch.randn(1, 8, 8, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused(x).sum().backward()
        with torch.no_grad():
            assert fused(x).dtype == torch.float32
    fused(x)  # float32 without autocast: the functions round nothing
    assert seen == [torch.float64, torch.float32, torch.float32]


def test_under_autocast_encode_decode_and_inverse_return_the_input_dtype():
    """The carried float64 stays inside: codes, outputs and inverses come back as float32. (Rounding them
    to float32 between two calls costs exactness only at bf16 level.)"""
    fused, _ = _bf16_pair(3)
    x = torch.randn(1, 8, 8, 16, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = fused.encode(x)
        decoded = fused.decode(codes)
        y = fused(x)
        back = fused.inverse(y)
    assert [c.dtype for c in codes] == [torch.float32] * 3
    assert decoded.dtype == y.dtype == back.dtype == torch.float32
    assert relative_error(decoded.detach(), y.detach()) < 1e-6
    assert relative_error(back.detach(), x.detach()) < 1e-3  # inverse of the float32-rounded output
    (decoded.sum() + back.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
