"""Step checkpoints in ``<run dir>/checkpoints/step-<N>.pt``: atomic, the newest k kept, resumable.

A checkpoint is written atomically (``staging.atomic_write``: a hidden temporary file, flushed to disk
and renamed), so a ``step-<N>.pt`` that exists is complete; the ``latest`` pointer is replaced the same
way after it. A crash mid-write leaves at most a ``.tmp-*`` file, never read and removed by the next save.

A checkpoint holds only tensors and plain values, and is read with ``weights_only=True``
(``read_checkpoint``): a file that would need the full unpickler is refused, never run.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from iunet3d.data.staging import atomic_write, remove_temporaries
from iunet3d.infer.checkpoint_file import UnsafeCheckpointError, read_checkpoint

CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.pt$")


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step-{step}.pt"


class CheckpointManager:
    """Saves and finds the checkpoints of one run (only the main rank calls ``save``)."""

    def __init__(self, directory: Path | str, keep: int = 3):
        if keep < 2:
            raise ValueError(f"keep: at least 2 checkpoints must be kept, got {keep}")
        self.directory = Path(directory)
        self.keep = keep

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        if not self.directory.is_dir():
            return []
        found = (CHECKPOINT_NAME.match(path.name) for path in self.directory.iterdir())
        return sorted(int(match.group(1)) for match in found if match)

    def save(self, step: int, state: dict) -> Path:
        """Write ``state`` as ``step-<step>.pt`` atomically, point ``latest`` at it, drop the oldest."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = checkpoint_path(self.directory, step)
        atomic_write(path, lambda file: torch.save(state, file))
        atomic_write(self.directory / "latest", lambda file: file.write(f"{path.name}\n".encode()))
        for old in self.steps()[: -self.keep]:
            checkpoint_path(self.directory, old).unlink(missing_ok=True)
        remove_temporaries(self.directory, self.directory)
        return path

    def load_latest(self) -> tuple[Path, dict] | None:
        """The newest checkpoint that loads, and its state; None if there is no checkpoint file.

        Saves are atomic, so a ``step-<N>.pt`` is complete unless the disk corrupted it; such a file is
        skipped with a warning and the one before it is used. A file that holds code or objects
        (``UnsafeCheckpointError``) stops the search: it is never skipped silently. Checkpoint files of
        which none loads are a ``ValueError`` naming each, not a fresh start.
        """
        unreadable = []
        for step in reversed(self.steps()):
            path = checkpoint_path(self.directory, step)
            try:
                return path, load_checkpoint(path)
            except UnsafeCheckpointError:
                raise
            except ValueError as error:
                warnings.warn(f"{path}: unreadable checkpoint skipped ({error})", stacklevel=2)
                unreadable.append(f"{path.name} ({str(error).removeprefix(f'{path}: ')})")
        if unreadable:
            raise ValueError(
                f"{self.directory}: no checkpoint is readable: {'; '.join(unreadable)}; move them away to start "
                "the run again from step 0, or use another run.dir"
            )
        return None


def load_checkpoint(path: Path | str) -> dict:
    """A checkpoint's state, read without running code (``read_checkpoint``), with tensors on the CPU."""
    state = read_checkpoint(path)
    if "model" not in state or "step" not in state:
        raise ValueError(f"{path}: not an iunet3d checkpoint (no 'model' and 'step')")
    return state
