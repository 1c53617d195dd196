"""Ctrl-C and SIGTERM: before the first round a run ends at once; during the rounds it stops
after the round in progress, and a second Ctrl-C stops it at once.

Once the rounds have begun, the first signal sets an event the server checks before each round
(fedlora/server.py): the round under way finishes, its history line and checkpoint are written,
and the run ends with RunInterrupted, which the CLI turns into a resume hint and exit code 130. A
second SIGINT or SIGTERM raises KeyboardInterrupt in the main thread, as Python's default
handler would.

Before the first round (the engine's start-up, Ray's, the handshake) there is no round to finish,
and the main thread may be blocked where no Python signal handler runs (Ray's C++ client waiting
for a GCS that is gone). There a signal is seen by a watcher thread, through the interpreter's
wakeup file descriptor, which lets the run put its directory in order (`StopRequest.starting`)
and ends the process with exit code 130 within moments.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODE = 130  # as a shell reports a process ended by SIGINT
_STOP_WATCHING = b"\0"  # no signal has number 0: the watcher's cue to end


class RunInterrupted(Exception):
    """The run was asked to stop and stopped after its last finished round (checkpoint written)."""

    def __init__(self, run_dir: Path, last_round: int, rounds: int) -> None:
        super().__init__(f"stopped after round {last_round} of {rounds}")
        self.run_dir, self.last_round, self.rounds = run_dir, last_round, rounds


class StopRequest(threading.Event):
    """Set by the first signal once the rounds have begun.

    The server asks `is_set` before each round (fedlora/server.py, sweeps between runs): its first
    question marks the rounds as begun, from when a signal stops the run after its round. Until
    then a signal ends the process (see the module docstring).
    """

    def __init__(self) -> None:
        super().__init__()
        self.rounds_begun = True  # outside a run's start-up (`starting`), nothing to end at once
        self._abandon: Callable[[], str] | None = None

    def is_set(self) -> bool:
        """Whether a stop was asked; asked by the server before a round, it marks the rounds as begun."""
        self.rounds_begun = True
        return super().is_set()

    @contextmanager
    def starting(self, abandon: Callable[[], str]) -> Iterator[None]:
        """A run's start-up, until its rounds begin: a signal then calls `abandon` (it puts the run
        directory in order and says what became of it) and ends the process with EXIT_CODE."""
        self.rounds_begun, self._abandon = False, abandon
        try:
            yield
        finally:
            self.rounds_begun, self._abandon = True, None

    def end_now(self, signum: int, notify: Callable[[str], None]) -> None:
        """End the process: a signal before the rounds began."""
        note = self._abandon() if self._abandon is not None else "no round had begun"
        notify(f"{signal.Signals(signum).name} before the first round: stopped now; {note}")
        sys.stdout.flush()
        sys.stderr.flush()
        # Not sys.exit: the main thread may be blocked in C code, and the ServerApp's thread would
        # keep the process alive. Ray's own processes share the driver's fate (Linux PDEATHSIG).
        os._exit(EXIT_CODE)


@contextmanager
def stop_on_signals(notify: Callable[[str], None]) -> Iterator[StopRequest]:
    """Within the block, SIGINT/SIGTERM stop the run as the module docstring says (`notify` tells the user)."""
    stop = StopRequest()

    def handle(signum: int, frame: FrameType | None) -> None:
        if not stop.rounds_begun:
            return  # the watcher ends the process
        if threading.Event.is_set(stop):  # not stop.is_set(): the handler is no question of the server's
            raise KeyboardInterrupt
        stop.set()
        notify(f"{signal.Signals(signum).name}: stopping after the round in progress (again to stop at once)")

    def watch(wakeups: int) -> None:
        while (signum := os.read(wakeups, 1)) != _STOP_WATCHING:
            if signum and signum[0] in STOP_SIGNALS and not stop.rounds_begun:
                stop.end_now(signum[0], notify)

    reader, writer = os.pipe()
    os.set_blocking(writer, False)  # the interpreter's C handler must never block on it
    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    previous_wakeup = signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, args=(reader,), name="fedlora-signal-watcher", daemon=True)
    watcher.start()
    try:
        yield stop
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.write(writer, _STOP_WATCHING)
        watcher.join()
        os.close(reader)
        os.close(writer)
