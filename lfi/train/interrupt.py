"""Ctrl-C during training: stop at a step boundary, save a resumable checkpoint, say how to resume.

The first SIGINT only sets a flag that the training loop reads after each optimizer step, so the
checkpoint it then writes is consistent (model, optimizer, step counter and RNG states of one
moment); a second SIGINT interrupts at once (KeyboardInterrupt), for a step that hangs.
"""
from __future__ import annotations

import signal
import sys
import threading


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by Trainer.run after Ctrl-C, once a resumable checkpoint was written.

    checkpoint: its path (None on processes other than the main one); epoch: the epoch in progress
    (1-based); step: optimizer steps done in it; of: steps per epoch."""

    def __init__(self, checkpoint, epoch: int, step: int, of: int):
        self.checkpoint, self.epoch, self.step, self.of = checkpoint, epoch, step, of
        where = f"epoch {epoch}, step {step}/{of}" if step else f"end of epoch {epoch - 1}"
        super().__init__(f"interrupted at {where}: resumable checkpoint {checkpoint}; continue with the same "
                         "command plus --resume auto (or --resume PATH)")


class StopRequest:
    """Context manager: while active, SIGINT sets ``requested`` instead of raising (main thread only;
    elsewhere signals cannot be handled and Ctrl-C keeps Python's default behaviour)."""

    def __init__(self, log=None):
        self.requested = False
        self._log = log
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        msg = "Ctrl-C: finishing the step in flight, then saving a resumable checkpoint (Ctrl-C again to stop now)"
        print(msg, file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
