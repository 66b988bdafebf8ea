"""DataLoaders for patches: the training ``PatchLoader`` (counts what it delivered, resumes) and validation.

Workers are started with ``spawn`` by default: zarrs' thread pool does not survive ``fork`` (see
``data/storage.py``), and every worker opens the stores itself (cases pickle as paths).

Workers ignore SIGTERM and SIGINT and leave shutdown to their rank. SLURM, ``timeout``, a shell and
torchrun's agent signal a whole process group or job, so the workers get the signal with their rank; a worker
killed by it would fail the rank ("DataLoader worker ... killed by signal: Terminated") before the rank saves
its preemption checkpoint. The rank stops its workers when it closes the loader or exits. The shield is up
once a worker runs its ``worker_init_fn``, a few seconds after the rank starts it (spawn imports torch first).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import weakref
from collections.abc import Callable, Iterator, Mapping

from torch.utils.data import DataLoader

from iunet3d.data.errors import DataError
from iunet3d.patches.patch_stream import PatchStream
from iunet3d.patches.validation_patches import ValidationPatches

START_METHODS = ("spawn", "forkserver", "fork")

#: The signals a DataLoader worker ignores, leaving them to its rank.
WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_workers_to_kill_at_exit: weakref.WeakSet = weakref.WeakSet()
_exit_hook_owner: list[int] = []  # the process that registered the exit hook (a forked child inherits it)


class ShieldedWorkerInit:
    """``worker_init_fn`` that makes the worker ignore ``WORKER_IGNORED_SIGNALS``, then calls ``then(worker_id)``
    if given. Picklable (spawned workers receive it by pickle) when ``then`` is."""

    def __init__(self, then: Callable[[int], None] | None = None):
        self.then = then

    def __call__(self, worker_id: int) -> None:
        for number in WORKER_IGNORED_SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


def _kill_workers_left_at_exit() -> None:
    """Workers still running at interpreter exit (a loader that was never closed): multiprocessing's own exit
    hook (which runs after this one) stops them with SIGTERM, which they ignore, and then waits for them
    forever. Kill them instead; they only prefetch batches."""
    if _exit_hook_owner != [os.getpid()]:
        return
    alive = [process for process in _workers_to_kill_at_exit if process.is_alive()]
    if alive:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report them as failed workers
    for process in alive:
        process.kill()
        process.join(timeout=5)


class ShieldedDataLoader(DataLoader):
    """A DataLoader whose workers ignore SIGTERM and SIGINT (see the module docstring).

    ``worker_init_fn``, if given, still runs in every worker, after the signals are ignored.
    """

    def __init__(self, *args, worker_init_fn: Callable[[int], None] | None = None, **kwargs):
        super().__init__(*args, worker_init_fn=ShieldedWorkerInit(worker_init_fn), **kwargs)

    def __iter__(self):
        before = set(multiprocessing.active_children())
        iterator = super().__iter__()  # starts the workers (once, with persistent workers)
        started = set(multiprocessing.active_children()) - before
        for worker in getattr(iterator, "_workers", []):  # torch ends a worker that will not stop with
            worker.terminate = worker.kill  # terminate(), i.e. SIGTERM, which ours ignore: SIGKILL instead
        if started and _exit_hook_owner != [os.getpid()]:
            _exit_hook_owner[:] = [os.getpid()]
            atexit.register(_kill_workers_left_at_exit)  # after multiprocessing's hook, so it runs before it
        _workers_to_kill_at_exit.update(started)
        return iterator


def _check_loader_arguments(batch_size: int, num_workers: int, multiprocessing_context: str) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size: expected a positive integer, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise DataError(f"num_workers: expected an integer >= 0, got {num_workers!r}")
    if multiprocessing_context not in START_METHODS:
        raise DataError(
            f"multiprocessing_context: expected one of {', '.join(START_METHODS)}, got {multiprocessing_context!r}"
        )


def _worker_options(num_workers: int, multiprocessing_context: str, prefetch_factor: int, persistent: bool) -> dict:
    if num_workers == 0:
        return {}
    return {"multiprocessing_context": multiprocessing_context, "prefetch_factor": prefetch_factor,
            "persistent_workers": persistent}  # fmt: skip


def unwrap_worker_error(error: DataError) -> DataError:
    """A worker's DataError re-raised by torch carries the worker's traceback as text: keep its message."""
    text = str(error)
    marker = "DataError: "
    if "Original Traceback" in text and marker in text:
        return DataError(text.rsplit(marker, 1)[1].strip() + " (in a DataLoader worker)")
    return error


class PatchLoader:
    """Batches of a ``PatchStream``: ``image`` (B, 1, D, H, W), ``label`` (B, D, H, W), ``case`` (B names),
    ``location`` (B, 3), ``index`` (B,).

    Workers ignore SIGTERM and SIGINT (``ShieldedDataLoader``); a ``worker_init_fn`` still runs in each.

    The stream's ``block_size`` is set to ``batch_size`` so that the batches come in the stream's order
    whatever ``num_workers`` is; ``state_dict`` is the stream position after the delivered batches, so a
    restored loader continues with exactly the next batch.
    """

    def __init__(
        self,
        stream: PatchStream,
        batch_size: int,
        num_workers: int = 2,
        *,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        multiprocessing_context: str = "spawn",
        worker_init_fn: Callable[[int], None] | None = None,
    ):
        _check_loader_arguments(batch_size, num_workers, multiprocessing_context)
        stream.block_size = batch_size
        self.stream = stream
        self.batch_size = batch_size
        self._options = {"batch_size": batch_size, "num_workers": num_workers, "pin_memory": pin_memory,
                         "worker_init_fn": worker_init_fn,
                         **_worker_options(num_workers, multiprocessing_context, prefetch_factor,
                                           persistent_workers)}  # fmt: skip
        self._loader: DataLoader | None = None
        self._iterator: Iterator | None = None
        self._delivered = 0

    def __iter__(self) -> PatchLoader:
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._loader = ShieldedDataLoader(self.stream, **self._options)
            self._iterator = iter(self._loader)
        try:
            batch = next(self._iterator)
        except DataError as error:
            raise unwrap_worker_error(error) from None
        self._delivered += len(batch["case"])
        return batch

    def state_dict(self) -> dict:
        """The stream state after every batch delivered so far (prefetched ones are not counted)."""
        return self.stream.state_dict(consumed=self._delivered)

    def load_state_dict(self, state: Mapping) -> None:
        """Continue after the batches recorded in ``state``; restarts the workers."""
        self.close()
        self.stream.load_state_dict(state)

    def close(self) -> None:
        """Stop the workers; the next batch starts new ones at the current position."""
        self.stream.start_at(self.stream.position + self._delivered)
        self._delivered = 0
        self._iterator = None  # the DataLoader's iterator shuts its workers down when released
        self._loader = None

    def __enter__(self) -> PatchLoader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def validation_loader(
    patches: ValidationPatches,
    batch_size: int,
    num_workers: int = 2,
    *,
    pin_memory: bool = False,
    persistent_workers: bool = True,
    multiprocessing_context: str = "spawn",
) -> DataLoader:
    """A DataLoader over this rank's validation patches, always in the same order; its workers ignore SIGTERM
    and SIGINT."""
    _check_loader_arguments(batch_size, num_workers, multiprocessing_context)
    options = _worker_options(num_workers, multiprocessing_context, 2, persistent_workers)
    return ShieldedDataLoader(
        patches, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin_memory, **options
    )
