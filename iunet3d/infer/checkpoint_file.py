"""Reading a checkpoint file without running code: ``torch.load(..., weights_only=True)`` only.

A training checkpoint holds tensors and plain values (dicts, lists, tuples, strings, numbers, None), which
the weights-only unpickler reads. A file that needs anything more (an arbitrary class or function, as a
crafted pickle would, or numpy arrays as checkpoints written before safe loading held) is refused with an
``UnsafeCheckpointError`` naming the file; nothing in it is executed.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch

_PICKLE_PROTOCOL_2_OR_LATER = b"\x80"
_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")


class UnsafeCheckpointError(ValueError):
    """A file that only a full unpickler (which may run any code) could read."""


def read_checkpoint(path: Path | str) -> dict:
    """The dict saved in the checkpoint at ``path``, with tensors on the CPU.

    ``ValueError`` (one line, naming the file) for a missing, unreadable or corrupt file, or one that does
    not hold a dict; ``UnsafeCheckpointError`` for a file that holds code or objects beyond plain values.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch's note on a bare pickle's protocol: it is refused below anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such checkpoint") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: a directory, not a checkpoint file") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot read the checkpoint ({error.strerror or error})") from None
    except pickle.UnpicklingError as error:
        unsafe = _GLOBAL.search(str(error))
        if unsafe is not None or _starts_like_a_pickle(path):
            what = f"it needs {unsafe.group(1)}" if unsafe else "a bare pickle stream, not a torch.save file"
            raise UnsafeCheckpointError(
                f"{path}: refuses to unpickle code/objects ({what}); an iunet3d checkpoint holds only tensors and "
                "plain values (checkpoints written before safe loading are refused too: train again, or resume from "
                "a checkpoint written by this version)"
            ) from None
        raise ValueError(f"{path}: not a readable checkpoint ({_detail(error)})") from None
    except (RuntimeError, EOFError) as error:
        raise ValueError(f"{path}: not a readable checkpoint ({_detail(error)})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not an iunet3d checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


def _starts_like_a_pickle(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            return file.read(1) == _PICKLE_PROTOCOL_2_OR_LATER
    except OSError:
        return False


def _detail(error: Exception) -> str:
    """The informative line of a torch.load error: the weights-only unpickler's own cause, else the first line."""
    if isinstance(error, EOFError):
        return "the file ends early: empty or truncated"
    cause = error.__cause__ or error.__context__
    text = str(cause) if isinstance(error, pickle.UnpicklingError) and cause is not None else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
