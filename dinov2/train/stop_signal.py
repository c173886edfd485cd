"""Stopping a run cleanly on a signal (SLURM's time-limit warning, a preemption), for it to resume."""
from __future__ import annotations

import signal


class StopSignal:
    """Signals that ask the run to save a checkpoint after the current iteration and stop.

    The handler only raises a flag: saving inside a signal handler, between two collectives of
    an iteration, would deadlock the other ranks. The handlers that were installed before (e.g.
    submitit's requeue on SLURM's time-limit warning) are kept for `forward`.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1,)) -> None:
        self.received: int | None = None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in signals}

    def _handle(self, signum: int, frame) -> None:
        self.received = signum

    def is_set(self) -> bool:
        return self.received is not None

    def forward(self) -> None:
        """Hand the received signal to the handler that was installed before this one."""
        previous = self._previous.get(self.received)
        if callable(previous):
            previous(self.received, None)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
