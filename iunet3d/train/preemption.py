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
        self.signal_name: str | None = None
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for number in signals:
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(number).name

    def restore(self) -> None:
        """Put the previous handlers back."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
