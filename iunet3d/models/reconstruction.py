"""The numerical health of an invertible network: how exactly it still inverts itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def relative_error(approximation: torch.Tensor, reference: torch.Tensor) -> float:
    """``|approximation - reference| / |reference|`` (2-norms, accumulated in float64)."""
    difference = torch.linalg.vector_norm(approximation.double() - reference.double())
    return float(difference / torch.linalg.vector_norm(reference.double()).clamp_min(1e-300))


@dataclass(frozen=True)
class ReconstructionError:
    """Relative reconstruction errors of an iUNet at one input.

    total: of the input recovered by ``inverse(forward(x))``.
    levels: per resolution level (0 at the top), of that level's code (skip, or the bottom tensor)
        recovered by inverting the decoder.
    """

    total: float
    levels: tuple[float, ...]

    def __float__(self) -> float:
        return self.total

    def metrics(self, prefix: str = "health/reconstruction_error") -> dict[str, float]:
        """``{prefix: total, prefix/level_<i>: ...}`` for logging."""
        return {prefix: self.total, **{f"{prefix}/level_{i}": error for i, error in enumerate(self.levels)}}
