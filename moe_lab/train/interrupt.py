"""Ctrl-C during training stops at the next step boundary, after a checkpoint, instead of losing
the steps since the last one; a second Ctrl-C stops at once (checkpoints are atomic either way)."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

__all__ = ["GracefulInterrupt", "TrainingInterrupted"]

log = logging.getLogger(__name__)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C at a step boundary, its checkpoint written: resume continues
    exactly there. A :class:`KeyboardInterrupt`, so that callers that stop on one still do."""

    def __init__(self, run_dir: Path, step: int) -> None:
        super().__init__(f"stopped at step {step}, checkpoint written in {run_dir}")
        self.run_dir, self.step = run_dir, step


class GracefulInterrupt:
    """While open, the first SIGINT only sets :attr:`requested`; the loop checks it between steps.

    Only a single process on its main thread defers the interrupt: under torchrun every rank
    receives it at its own moment, and a checkpoint is a collective all ranks must enter together.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupted: stopping after this step with a checkpoint (Ctrl-C again: now)")

    def __enter__(self) -> GracefulInterrupt:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)
