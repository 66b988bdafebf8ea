"""SIGTERM (preemption) as a flag the training loop polls, so every rank stops at the same step.

Under torchrun the signal reaches a rank in one of two ways, and both end with a checkpoint:

- Sent to the torchrun agent (its process group: SLURM, ``timeout``, a shell; or the agent alone:
  Kubernetes, ``kill``): the agent forwards it to the process group of each rank (torchrun starts every
  rank in a session of its own), waits up to ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (torchrun's
  ``--shutdown-timeout``, default 30) for the ranks to exit, SIGKILLs those left, and then exits 1 itself
  (an uncaught ``SignalException``), although every rank exited 0. Raise the timeout if a step plus a
  checkpoint can take longer.
- Sent to every process of the job (SLURM with cgroups): a rank may get it twice, which is harmless.

Either way each rank's DataLoader workers get it too; they ignore it (``patches/patch_loader.py``) and are
stopped by their rank, which closes its loader when it stops.
"""

from __future__ import annotations

import signal
import threading


class PreemptionFlag:
    """Set when this process receives one of ``signals``; ``requested`` tells the loop to save and stop.

    The loop reduces the flag across ranks once per step (``max``), so a signal that reaches only some
    ranks, or reaches them at different times, still stops all of them after the same step.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)):
        self.requested = False
        self.signal_name = signals[0].name  #: the signal received (until then: the first one listened to)
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for number in signals:
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(number).name

    def restore(self, preempted: bool = False) -> None:
        """Put the previous handlers back; after a preemption (``preempted``: this rank or another got the
        signal) ignore the signals instead. The process is on its way out then, and a signal arriving late
        (the launcher forwarding it, or the signal reaching the ranks at different times) must not kill it
        after its checkpoint. Ignoring, not keeping our handler: Python resets its own handlers to the
        default action at interpreter shutdown, but leaves SIG_IGN alone."""
        for number, handler in self._previous.items():
            signal.signal(number, signal.SIG_IGN if preempted else handler)
        self._previous.clear()
