"""The pieces behind a clean stop: signals that stop after the round in progress, writes that are never seen half done."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlora import rundir
from fedlora.interrupt import stop_on_signals
from fedlora.simulation import abandon_start, signal_handlers_kept_from_ray

ROOT = Path(__file__).resolve().parent.parent

# A run's start-up whose main thread waits where no Python code runs (as Ray's C++ client waits for
# a dead GCS), with a thread that is not a daemon (as the ServerApp's): only the watcher can end it.
BLOCKED_START_UP = """
import os, sys, threading
from fedlora.interrupt import stop_on_signals
threading.Thread(target=threading.Event().wait).start()
with stop_on_signals(print) as stop, stop.starting(lambda: "what the run leaves, said here"):
    reader, _ = os.pipe()
    print("starting", flush=True)
    os.read(reader, 1)
"""


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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_before_the_first_round_ends_the_process_at_once(sig: signal.Signals) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", BLOCKED_START_UP], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert process.stdout.readline() == "starting\n"
        asked = time.monotonic()
        process.send_signal(sig)
        output, _ = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 130 and time.monotonic() - asked < 10
    assert output == f"{sig.name} before the first round: stopped now; what the run leaves, said here\n"


def test_once_the_server_asked_a_signal_stops_after_the_round_again(tmp_path: Path) -> None:
    with stop_on_signals(lambda note: None) as stop, stop.starting(lambda: "no"):
        assert not stop.is_set()  # the server's question before round 1
        os.kill(os.getpid(), signal.SIGTERM)  # the watcher leaves it to the handler: this process lives on
        assert stop.is_set()


def test_a_new_run_stopped_before_its_first_round_leaves_nothing_and_a_resumed_one_is_kept(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for name in (rundir.LOCK, "config.json", "history.jsonl"):
        (fresh / name).write_text("{}")
    assert "removed" in abandon_start(fresh, resume=False) and not fresh.exists()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "checkpoint.pt").write_text("kept")
    assert f"--resume {resumed}" in abandon_start(resumed, resume=True)
    assert (resumed / "checkpoint.pt").read_text() == "kept"


def test_rays_sigterm_handler_does_not_replace_the_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    def ray_init_as_ray_does(backend: object, config: object) -> None:  # ray.init sets a handler that exits
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))

    monkeypatch.setattr(RayBackend, "init_ray", ray_init_as_ray_does)
    with stop_on_signals(lambda note: None) as stop, signal_handlers_kept_from_ray():
        ours = signal.getsignal(signal.SIGTERM)
        RayBackend.init_ray(object(), {})
        assert signal.getsignal(signal.SIGTERM) is ours
        os.kill(os.getpid(), signal.SIGTERM)  # no SystemExit: the run stops after its round
        assert stop.is_set()
    assert RayBackend.init_ray is ray_init_as_ray_does


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
