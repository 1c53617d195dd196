"""The pieces behind a clean stop: signals that stop after the round in progress, writes that are never seen half done."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from fedlora import rundir
from fedlora.interrupt import stop_on_signals


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT])
def test_the_first_signal_asks_to_stop_and_a_second_stops_at_once(first: signal.Signals) -> None:
    notes: list[str] = []
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with stop_on_signals(notes.append) as stop:
        os.kill(os.getpid(), first)  # delivered to the main thread before kill returns to Python code
        assert stop.is_set() and notes == [f"{first.name}: stopping after the round in progress (again to stop at once)"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {sig: signal.getsignal(sig) for sig in before} == before  # the previous handlers are back


def test_an_atomic_write_cut_short_leaves_the_old_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "summary.json"
    rundir.write_atomic(target, '{"status": "finished"}')

    def crash(*args: object) -> None:
        raise OSError("the process died before the rename")

    monkeypatch.setattr(rundir.os, "replace", crash)
    with pytest.raises(OSError):
        rundir.write_atomic(target, '{"status": "running", "rounds": 1' + " " * 100_000 + "}")
    assert target.read_text() == '{"status": "finished"}'  # readers still see the whole old file
    monkeypatch.undo()
    rundir.write_atomic(target, '{"status": "running"}')
    assert target.read_text() == '{"status": "running"}' and not list(tmp_path.glob("*.partial"))
