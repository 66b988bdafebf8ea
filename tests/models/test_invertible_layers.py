"""Every invertible layer: exact inverse in float64 and correct gradients (gradcheck)."""

import inspect

import pytest
import torch
from torch.func import functional_call

import iunet3d.models
from iunet3d.models.orthogonal import ORTHOGONAL_METHODS
from iunet3d.models.registry import INVERTIBLE_LAYERS, layer_examples
from tests.helpers.tensors import randomise_parameters, relative_error

EXAMPLES = layer_examples()
#: Every example with every orthogonal parametrisation it has (layers without one: once).
EXAMPLE_METHODS = [
    pytest.param(example, method, id=f"{example.name}-{method}")
    for example in EXAMPLES
    for method in (ORTHOGONAL_METHODS if example.orthogonal else ORTHOGONAL_METHODS[:1])
]


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def _build(example, method, weights):
    layer = example.build(method).double()
    if weights == "random":
        randomise_parameters(layer)
    return layer


def _inputs(example):
    return tuple(torch.randn(shape, dtype=torch.float64) for shape in example.input_shapes)


@pytest.mark.parametrize("weights", ["initial", "random"])
@pytest.mark.parametrize(("example", "method"), EXAMPLE_METHODS)
def test_inverse_of_forward_is_identity(example, method, weights):
    layer = _build(example, method, weights)
    inputs = _inputs(example)
    with torch.no_grad():
        outputs = _as_tuple(layer(*inputs))
        reconstructed = _as_tuple(layer.inverse(*outputs))
        again = _as_tuple(layer(*reconstructed))
    for original, back in zip(inputs, reconstructed, strict=True):
        assert back.shape == original.shape
        assert relative_error(back, original) < 1e-10
    for first, second in zip(outputs, again, strict=True):
        assert relative_error(second, first) < 1e-10


class _Inverse(torch.nn.Module):
    """Runs ``layer.inverse`` as forward, so functional_call can substitute its parameters."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, *tensors):
        return self.layer.inverse(*tensors)


@pytest.mark.parametrize(
    ("weights", "direction"), [(w, d) for w in ("initial", "random") for d in ("forward", "inverse")]
)
@pytest.mark.parametrize(("example", "method"), EXAMPLE_METHODS)
def test_gradcheck_inputs_and_parameters(example, method, weights, direction):
    layer = _build(example, method, weights)
    inputs = _inputs(example)
    if direction == "inverse":
        with torch.no_grad():
            inputs = _as_tuple(layer(*inputs))
        layer = _Inverse(layer)
    names = [name for name, _ in layer.named_parameters()]
    assert names, "every example has learnable parameters whose gradients gradcheck checks"
    parameters = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    inputs = tuple(x.detach().requires_grad_() for x in inputs)

    def function(*args):
        state = dict(zip(names, args[len(inputs) :], strict=True))
        return functional_call(layer, state, args[: len(inputs)])

    assert torch.autograd.gradcheck(function, inputs + parameters, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_outputs_never_share_storage_with_inputs(example):
    """The reversible wrapper releases a block's input storage: an output aliasing it would be lost."""
    layer = _build(example, "cayley", "random")
    inputs = _inputs(example)
    with torch.no_grad():
        outputs = _as_tuple(layer(*inputs))
        reconstructed = _as_tuple(layer.inverse(*outputs))
    for sources, results in ((inputs, outputs), (outputs, reconstructed)):
        source_pointers = {t.untyped_storage().data_ptr() for t in sources}
        assert not source_pointers & {t.untyped_storage().data_ptr() for t in results}


def test_registry_lists_every_invertible_layer():
    """A module class in iunet3d.models with an ``inverse`` must be in INVERTIBLE_LAYERS and tested."""
    import pkgutil

    found = set()
    for info in pkgutil.iter_modules(iunet3d.models.__path__):
        module = __import__(f"iunet3d.models.{info.name}", fromlist=["_"])
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (issubclass(cls, torch.nn.Module) and cls.__module__.startswith("iunet3d.models")
                    and "inverse" in cls.__dict__ and cls.__name__ != "iUNet"):  # fmt: skip
                found.add(cls)
    listed = set(INVERTIBLE_LAYERS)
    missing = {cls for cls in found if not any(issubclass(cls, base) for base in listed)}
    assert not missing, f"invertible layers missing from INVERTIBLE_LAYERS: {missing}"
    assert {e.layer_type for e in EXAMPLES} == listed


REUSING = [e for e in EXAMPLES if getattr(e.layer_type, "can_reuse_input", False)]


def test_some_layers_reuse_their_input_at_inference():
    assert {e.layer_type.__name__ for e in REUSING} >= {"AdditiveCoupling", "SplitAndDownsample"}


@pytest.mark.parametrize("example", REUSING, ids=[e.name for e in REUSING])
def test_forward_reusing_its_input_equals_forward(example):
    """The inference variant (in place / views) gives exactly forward's outputs; the coupling's is written
    into its input, which is why only ``InferencePass`` calls it, on tensors it owns."""
    layer = _build(example, "cayley", "random")
    inputs = _inputs(example)
    given_up = tuple(x.clone() for x in inputs)
    with torch.no_grad():
        expected = _as_tuple(layer(*inputs))
        reused = _as_tuple(layer(*given_up, reuse_input=True))
    for want, got in zip(expected, reused, strict=True):
        assert got.shape == want.shape
        assert torch.equal(got, want)
    if example.layer_type.__name__ == "AdditiveCoupling":
        assert reused[0].untyped_storage().data_ptr() == given_up[0].untyped_storage().data_ptr()
    with torch.enable_grad():  # with gradients the input is never reused
        inputs_with_grad = tuple(x.clone().requires_grad_() for x in inputs)
        outputs = _as_tuple(layer(*inputs_with_grad, reuse_input=True))
    pointers = {x.untyped_storage().data_ptr() for x in inputs_with_grad}
    assert not pointers & {y.untyped_storage().data_ptr() for y in outputs}
