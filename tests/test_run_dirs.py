"""Run directories that never lie and never lose work: locks, no silent overwrite, safe resume, signals."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedlora import workspace
from fedlora.checkpoint import Checkpoint, save_checkpoint
from fedlora.results import CHECKPOINT, CONFIG, HISTORY, SUMMARY, default_run_dir, read_history, read_summary
from fedlora.rundir import RunDirError, RunLock, claim_run_dir
from fedlora.simulation import simulate
from tests.conftest import TINY, run_cli, tiny_config, without_timings

ROOT = Path(__file__).resolve().parent.parent


def toml_of(tree: dict, prefix: str = "") -> str:
    """A small TOML writer for the tiny config (tables of scalars)."""
    scalars = [f"{k} = {json.dumps(v)}" for k, v in tree.items() if not isinstance(v, dict)]
    tables = [f"\n[{prefix}{k}]\n" + toml_of(v, f"{prefix}{k}.") for k, v in tree.items() if isinstance(v, dict)]
    return "\n".join(scalars) + "".join(tables)


def tiny_file(tmp_path: Path, rounds: int = 2, privacy: dict | None = None) -> Path:
    tree = json.loads(json.dumps(TINY))
    tree["federation"]["rounds"] = rounds
    if privacy:
        tree["privacy"] = privacy
    path = tmp_path / "tiny.toml"
    path.write_text(toml_of(tree) + "\n")
    return path


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedlora.cli", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def wait_for_round(run_dir: Path, wanted: int, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / HISTORY).exists() and any(r["round"] >= wanted for r in read_history(run_dir)):
            return
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.1)
    raise TimeoutError(f"round {wanted} not recorded within {timeout:.0f} s")


def finished_run(path: Path, rounds: int = 2) -> Path:
    """A run directory as a finished run leaves it (synthetic: config, history, summary, adapter)."""
    path.mkdir(parents=True)
    (path / CONFIG).write_text(tiny_config().to_json())
    (path / HISTORY).write_text("".join(json.dumps({"round": r, "accuracy": 0.5, "loss": 1.0}) + "\n" for r in range(rounds + 1)))
    (path / SUMMARY).write_text(json.dumps({"status": "finished", "rounds": rounds, "final_accuracy": 0.5}))
    (path / "adapter").mkdir()
    (path / "adapter" / "adapter_config.json").write_text("{}")
    return path


# --- locks and overwrites --------------------------------------------------------------------


def test_a_second_process_is_refused_a_locked_run_directory(tmp_path: Path) -> None:
    with RunLock(tmp_path / "run"):
        code = "from fedlora.rundir import RunLock; import sys; RunLock(sys.argv[1]).acquire()"
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True)
        assert other.returncode != 0 and "is in use by" in other.stderr and str(os.getpid()) in other.stderr
    with RunLock(tmp_path / "run"):  # released: free again
        pass


def test_rerunning_into_a_finished_run_is_refused_without_overwrite(tmp_path: Path) -> None:
    run_dir = finished_run(tmp_path / "run")
    code, output = run_cli("simulate", str(tiny_file(tmp_path)), "--out", str(run_dir))
    assert code == 2 and len(output.splitlines()) == 1 and "already holds a run" in output and "--overwrite" in output
    assert json.loads((run_dir / SUMMARY).read_text())["status"] == "finished"  # nothing lost


def test_overwrite_removes_every_file_of_the_old_run_first(tmp_path: Path) -> None:
    run_dir = finished_run(tmp_path / "run")
    (run_dir / "notes.txt").write_text("mine")
    with RunLock(run_dir):
        claim_run_dir(run_dir, overwrite=True)
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "notes.txt"]


def test_a_non_empty_directory_that_is_not_a_run_is_refused(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff")
    with pytest.raises(RunDirError, match="holds no run"):
        claim_run_dir(tmp_path / "photos", overwrite=True)


def test_two_default_run_directories_started_in_one_second_differ(tmp_path: Path) -> None:
    config = tiny_config(output_dir=str(tmp_path))
    first = default_run_dir(config)
    first.mkdir()
    assert default_run_dir(config) != first


# --- a run directory that cannot be written --------------------------------------------------


def read_only_below(folder: Path):
    """Path.mkdir as on a read-only file system inside `folder`."""
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if self.is_relative_to(folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        real_mkdir(self, *args, **kwargs)

    return mkdir


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (lambda t: t / "notes.txt", "notes.txt is a file, not a directory"),
        (lambda t: t / "notes.txt" / "run", "notes.txt is a file, not a directory"),
        (lambda t: t / "readonly" / "run", "Read-only file system"),
        (lambda t: t / ("x" * 300), "File name too long"),
    ],
    ids=["a-file", "under-a-file", "read-only", "name-too-long"],
)
def test_an_out_that_cannot_be_written_is_one_line_and_exit_2(
    out, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.setattr(Path, "mkdir", read_only_below(tmp_path / "readonly"))
    code, output = run_cli("simulate", str(tiny_file(tmp_path)), "--out", str(out(tmp_path)))
    assert code == 2 and len(output.strip().splitlines()) == 1 and message in output and "Traceback" not in output, output
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_file_the_run_cannot_write_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedlora import cli

    history = tmp_path / "run" / HISTORY

    def refused(*_: object, **__: object) -> dict:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(history))

    monkeypatch.setattr(cli, "run_with_progress", refused)
    code, output = run_cli("simulate", str(tiny_file(tmp_path)), "--out", str(tmp_path / "run"))
    assert code == 2 and len(output.strip().splitlines()) == 1 and "Traceback" not in output, output
    assert str(history) in output.replace("\n", "") and "Permission denied" in output


def test_compare_into_an_out_that_is_a_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(tiny_file(tmp_path).read_text() + "\n[sweep]\nseed = [0, 1]\n")
    (tmp_path / "notes.txt").write_text("mine")
    code, output = run_cli("compare", str(sweep), "--out", str(tmp_path / "notes.txt"))
    assert code == 2 and len(output.strip().splitlines()) == 1 and "is a file, not a directory" in output, output
    assert (tmp_path / "notes.txt").read_text() == "mine"


# --- resume refuses what it cannot continue --------------------------------------------------


def test_resume_of_a_finished_run_says_so_at_once(tmp_path: Path) -> None:
    run_dir = finished_run(tmp_path / "run")
    started = time.perf_counter()
    code, output = run_cli("simulate", "--resume", str(run_dir))
    assert code == 0 and "already finished" in output and time.perf_counter() - started < 10


def interrupted_run(path: Path, tensors: dict | None = None, history_rounds: int = 1) -> Path:
    """A run stopped after round 1: config, history, checkpoint (with `tensors` if given)."""
    config = tiny_config()
    path.mkdir(parents=True)
    (path / CONFIG).write_text(config.to_json())
    lines = [{"round": r, "accuracy": 0.1, "loss": 2.0} for r in range(history_rounds + 1)]
    (path / HISTORY).write_text("".join(json.dumps(line) + "\n" for line in lines))
    state = workspace.initial_state(config, workspace.federated_task(config).num_labels)
    save_checkpoint(path, Checkpoint(1, tensors if tensors is not None else state.tensors(), config.model_dump(mode="json")))
    return path


def _summary(run_dir: Path, **changes: object) -> None:
    """A finished run's summary.json with `changes` (a value of ... leaves the key out)."""
    summary = {"status": "finished", "rounds": 1, "final_accuracy": 0.5} | changes
    (run_dir / SUMMARY).write_text(json.dumps({key: value for key, value in summary.items() if value is not ...}))


def _history(run_dir: Path, index: int, line: str) -> None:
    """Replace line `index` of history.jsonl, keeping the lines after it."""
    lines = (run_dir / HISTORY).read_text().splitlines()
    lines[index] = line
    (run_dir / HISTORY).write_text("\n".join(lines) + "\n")


def _nan_tensors() -> dict:
    config = tiny_config()
    tensors = workspace.initial_state(config, workspace.federated_task(config).num_labels).tensors()
    first = next(iter(tensors))
    tensors[first] = torch.full_like(tensors[first], math.nan)
    return tensors


def _wrong_shape_tensors() -> dict:
    config = tiny_config()
    tensors = workspace.initial_state(config, workspace.federated_task(config).num_labels).tensors()
    first = next(iter(tensors))
    tensors[first] = torch.zeros(3, 3)
    return tensors


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / CHECKPOINT).write_bytes((d / CHECKPOINT).read_bytes()[:100]), "cannot be read"),
        (lambda d: (d / CHECKPOINT).write_bytes(os.urandom(4096)), "cannot be read"),
        (
            lambda d: (
                interrupted_run(d.with_name("nan"), _nan_tensors())
                and os.replace(d.with_name("nan") / CHECKPOINT, d / CHECKPOINT)
            ),
            "NaN",
        ),
        (
            lambda d: (
                interrupted_run(d.with_name("shape"), _wrong_shape_tensors())
                and os.replace(d.with_name("shape") / CHECKPOINT, d / CHECKPOINT)
            ),
            "the model has",
        ),
        (lambda d: (d / HISTORY).write_text(""), "history lacks round"),
        (lambda d: _summary(d, final_accuracy=...), "'final_accuracy' is missing"),
        (lambda d: _summary(d, rounds="2"), "'rounds' is \"2\", where it should be a whole number"),
        (lambda d: (d / SUMMARY).write_text('{"status": "fini'), "summary.json: not valid JSON"),
        (lambda d: _history(d, 0, '{"round": 0, "accur'), "history.jsonl: line 1 is not a JSON object"),
        (lambda d: _history(d, 0, '{"accuracy": 0.1, "loss": 2.0}'), 'line 1 is not a JSON object with a whole "round"'),
        (lambda d: _history(d, 1, '{"round": 1, "accuracy": "high", "loss": 2.0}'), "round 1: accuracy: Input should be"),
    ],
    ids=[
        "truncated",
        "garbage",
        "nan-factors",
        "wrong-shape",
        "empty-history",
        "summary-without-a-key",
        "summary-key-mistyped",
        "summary-torn",
        "history-corrupt-middle-line",
        "history-line-without-round",
        "history-figure-mistyped",
    ],
)
def test_a_damaged_run_is_refused_before_anything_is_touched(damage, message: str, tmp_path: Path) -> None:
    run_dir = interrupted_run(tmp_path / "run")
    damage(run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    code, output = run_cli("simulate", "--resume", str(run_dir))
    assert code == 2 and len(output.splitlines()) == 1 and message in output and "Traceback" not in output, output
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"
    }


def test_a_torn_last_history_line_is_left_out(tmp_path: Path) -> None:
    (tmp_path / HISTORY).write_text('{"round": 0}\n{"round": 1}\n{"rou')
    assert [line["round"] for line in read_history(tmp_path)] == [0, 1]


# --- through the real engine -----------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.usefixtures("one_ray")
def test_a_running_simulation_refuses_a_second_stops_on_sigint_and_resumes_to_the_uninterrupted_history(
    tmp_path: Path,
) -> None:
    # Under DP, so that the privacy ledgers too must come through the stop and the resume unchanged.
    config_file = tiny_file(tmp_path, rounds=4, privacy={"enabled": True, "epsilon": 8.0})
    reference = tmp_path / "reference"
    from fedlora.config import load_config

    simulate(load_config(config_file), reference)
    run_dir = tmp_path / "run"
    process = start_cli("simulate", str(config_file), "--out", str(run_dir))
    try:
        wait_for_round(run_dir, 0, process)
        # A second run into the same directory, started in this process (where fedlora is already
        # imported, so it reaches the lock in well under a second, while the first has rounds to
        # go): it is refused, naming the first, and leaves the first's work alone.
        code, refused = run_cli("simulate", str(config_file), "--out", str(run_dir), "--overwrite")
        assert process.poll() is None, "the first run ended before the second tried"
        assert code == 2 and "is in use by" in refused and str(process.pid) in refused, refused
        wait_for_round(run_dir, 1, process)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, output
    assert f"--resume {run_dir}" in output.replace("\n", "")
    recorded = [line["round"] for line in read_history(run_dir)]
    checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert recorded == list(range(checkpoint["round"] + 1)) and checkpoint["round"] < 4  # consistent, unfinished
    assert not (run_dir / SUMMARY).exists()
    code, resumed = run_cli("simulate", "--resume", str(run_dir))  # in this process: the shared Ray is warm
    assert code == 0, resumed
    assert without_timings(read_history(run_dir)) == without_timings(read_history(reference))
    assert read_summary(run_dir)["privacy"] == read_summary(reference)["privacy"]  # every client's ledger
