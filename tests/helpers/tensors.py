"""Tensor helpers: random parameters, relative error, and a warning check that leaves other warnings alone."""

import warnings
from contextlib import contextmanager

import torch


def randomise_parameters(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    """Replace every parameter by random values (so zero-initialised layers are non-trivial)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * scale)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@contextmanager
def expect_warning(match: str):
    """Like ``pytest.warns`` but without re-emitting other warnings (memcnn's filtered deprecation
    warning would otherwise resurface inside the block)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    messages = [str(w.message) for w in caught]
    assert any(match in m for m in messages), f"no warning containing {match!r}, got {messages}"
