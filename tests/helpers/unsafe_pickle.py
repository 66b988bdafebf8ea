"""Checkpoint files that run code when unpickled in full: a marker directory appears if anything loads them."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch


class CreatesMarker:
    """Unpickling this calls ``os.mkdir(marker)``: proof that a loader ran code taken from the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def write_code_checkpoint(path: Path, marker: Path, state: dict | None = None) -> Path:
    """A ``torch.save`` file of ``state`` (default: a minimal checkpoint) plus one key holding a ``CreatesMarker``."""
    torch.save({**(state or {"model": {}, "step": 1}), "payload": CreatesMarker(marker)}, path)
    return path


def write_bare_pickle(path: Path, marker: Path) -> Path:
    """A plain pickle stream (not a ``torch.save`` file) of a ``CreatesMarker``."""
    path.write_bytes(pickle.dumps(CreatesMarker(marker)))
    return path


WRITERS = {"torch.save file": write_code_checkpoint, "bare pickle": write_bare_pickle}
