"""SIGTERM (preemption) as a flag the training loop polls, so every rank stops at the same step."""

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
