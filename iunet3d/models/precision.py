"""Precision of the carried tensors, so that reversible backprop reconstructs them exactly enough.

An invertible block's function F is re-evaluated in backward on the input reconstructed from the
block's output. When F computes in reduced precision (bf16/fp16 under autocast, a 16-bit model, or
TF32 convolutions on CUDA), its input is rounded first, and a reconstruction that differs from the
forward value in the last bit of float32 crosses a rounding boundary for about 2.5e-5 of the elements
of every block. Each such flip changes F's output well beyond float32 rounding (through normalisation,
everywhere), and the error compounds from block to block: measured on a 30-coupling iUNet under CPU
bf16 autocast with float32 carried tensors, ``inverse(forward(x))`` was off by 7.9e-3 (and parameter
gradients by up to 11% in a prototype that carried float32).

So, when F computes in reduced precision and gradients are computed, the tensors carried from block to
block are float64 (inference, which reconstructs nothing, keeps the input's dtype): the
additive updates (a 16-bit F output added to a float64 value) are then exact, orthogonal resampling and
mixing round only at 1e-16, and F receives its input through ``function_input``, which scales it by
``1 + DITHER`` before rounding. Values that are sums of few-bit numbers (the float32 input plus bf16
updates) can otherwise sit exactly on a rounding tie (about 2^-16 of float32 values), where even a
1e-16 difference flips the rounding; after the scaling they are full 53-bit numbers. The scaling
changes F's input by 2e-7 relative, far below bf16's resolution, and is the same for every engine.
"""

from __future__ import annotations

import math

import torch

#: Relative scaling of a coupling function's input before it is rounded to reduced precision (a 53-bit
#: constant, so that few-bit carried values do not land on rounding ties).
DITHER = math.pi * 2.0**-24

_REDUCED = (torch.float16, torch.bfloat16)
#: The autocast dtype of each ``precision`` option of training and prediction ("fp32": none).
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a ``precision`` option ("bf16", "fp16", "fp32") on ``device``: autocast is
    used on CUDA only (CPU runs float32, where bf16 convolutions are emulated and slower)."""
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision: expected one of {', '.join(AUTOCAST_DTYPES)}, got {precision!r}")
    return AUTOCAST_DTYPES[precision] if torch.device(device).type == "cuda" else None


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def reduced_precision(x: torch.Tensor) -> bool:
    """Whether functions applied to ``x`` compute in reduced precision: autocast on its device, a 16-bit
    ``x``, or float32 on CUDA with TF32 convolutions allowed."""
    if _autocast_dtype(x.device.type) is not None or x.dtype in _REDUCED:
        return True
    return x.device.type == "cuda" and x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32


def carried(x: torch.Tensor, for_backward: bool | None = None) -> torch.Tensor:
    """``x`` in the dtype the iUNet carries between its blocks: float64 when its functions compute in
    reduced precision and backward will reconstruct the activations (``for_backward``, by default whether
    grad mode is on), else unchanged: inference reconstructs nothing and keeps the input's dtype."""
    if for_backward is None:
        for_backward = torch.is_grad_enabled()
    if for_backward and reduced_precision(x) and x.dtype != torch.float64:
        return x.to(torch.float64)
    return x


def function_input(half: torch.Tensor, parameter_dtype: torch.dtype | None) -> torch.Tensor:
    """A coupling function's input: a float64 carried tensor is scaled by ``1 + DITHER`` and rounded to
    the dtype the function computes in (autocast's, else its parameters'). Other inputs are unchanged."""
    if half.dtype != torch.float64:
        return half
    target = _autocast_dtype(half.device.type) or parameter_dtype or torch.float64
    if target == torch.float64:
        return half
    return (half * (1.0 + DITHER)).to(target)


def full_precision(tensor: torch.Tensor):
    """A context with autocast off for ``tensor``'s device: orthogonal resampling and mixing keep the dtype
    of the tensors they transform (rounded to bf16, their inverses would be off by about 1e-2)."""
    return torch.autocast(tensor.device.type if tensor.device.type in ("cpu", "cuda") else "cpu", enabled=False)
