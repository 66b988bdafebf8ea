"""A process's random number generator states (torch, CUDA, numpy, Python) as tensors and plain values.

Checkpoints hold these, so they must load with ``torch.load(..., weights_only=True)``: numpy's state (a
tuple with a uint32 array) is stored as a dict with an int64 tensor of its keys; Python's is a tuple of ints.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng_state(device: torch.device) -> dict:
    """This process's RNG states; ``device``: the CUDA generator of a CUDA device is included."""
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": str(bit_generator),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    """Set the generators to a ``capture_rng_state`` result."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
