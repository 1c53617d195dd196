"""Ctrl-C and SIGTERM stop a run after the round in progress; a second Ctrl-C stops it at once.

The first signal sets an event the server checks before each round (fedlora/server.py): the
round under way finishes, its history line and checkpoint are written, and the run ends with
RunInterrupted, which the CLI turns into a resume hint and exit code 130. A second SIGINT or
SIGTERM raises KeyboardInterrupt in the main thread, as Python's default handler would.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODE = 130  # as a shell reports a process ended by SIGINT


class RunInterrupted(Exception):
    """The run was asked to stop and stopped after its last finished round (checkpoint written)."""

    def __init__(self, run_dir: Path, last_round: int, rounds: int) -> None:
        super().__init__(f"stopped after round {last_round} of {rounds}")
        self.run_dir, self.last_round, self.rounds = run_dir, last_round, rounds


@contextmanager
def stop_on_signals(notify: Callable[[str], None]) -> Iterator[threading.Event]:
    """Within the block, the first SIGINT/SIGTERM sets the yielded event (and calls `notify`)."""
    stop = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        notify(f"{signal.Signals(signum).name}: stopping after the round in progress (again to stop at once)")

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
