"""Where a run came from, for summary.json: the code (git), the command, the time, the machine, the data.

Written once when a run starts, as <run_dir>/metadata.json, so that a resumed run keeps its
original start and adds when, by which command and where it was resumed; the server copies it
into summary.json at the end (fedlora/results.py).

    config_file       the experiment file the run was started from (absolute), or null (a run
                      started from Python, or `--resume`)
    git               {"commit", "dirty"} of the repository holding that file, or null (no file,
                      not in a repository, no git, or git too slow)
    command           sys.argv of the process that started the run
    started_at        ISO 8601, UTC
    host              platform, CPU model and count, GPU names (torch.cuda)
    data_fingerprint  sha256 over the class names, every client's share (in client order) and the
                      held-out split the server's task holds: equal fingerprints, same data split alike
    resumed           [{"at", "command", "host"}] for each resume (absent for a run never resumed)

The CLI names the config file (`runs_from`); the server, which writes the file, runs in another
thread of the same process and reads it from there.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.rundir import write_atomic

if TYPE_CHECKING:
    from fedlora.workspace import FederatedTask

METADATA = "metadata.json"
GIT_SECONDS = 5.0  # a git that takes longer (a huge or network-mounted repository) is skipped

_CONFIG_FILES: list[Path | None] = []  # the config files of the runs this process is starting, innermost last


@contextmanager
def runs_from(config_file: Path | None) -> Iterator[None]:
    """While it lasts, the runs this process starts record `config_file` as where they came from."""
    _CONFIG_FILES.append(Path(config_file).resolve() if config_file is not None else None)
    try:
        yield
    finally:
        _CONFIG_FILES.pop()


def record_start(run_dir: Path, data_fingerprint: str, resume: bool) -> None:
    """Write metadata.json: a new run's origin; for a resumed run (one that continues from a
    checkpoint), its origin plus this resume. A resumed run whose data's fingerprint differs
    from its start's is told in a warning: its rounds were trained on two data sets."""
    path = Path(run_dir) / METADATA
    if not resume:
        write_atomic(path, json.dumps(start_record(data_fingerprint), indent=2))
        return
    recorded = read_metadata(run_dir)
    if recorded.get("data_fingerprint") not in (None, data_fingerprint):
        logging.getLogger("flwr").warning(
            "%s: the data differ from those the run started with (fingerprint %s, now %s): its later rounds train on other data",
            run_dir,
            str(recorded["data_fingerprint"])[:12],
            data_fingerprint[:12],
        )
    # A run from before metadata.json existed gets what can still be known, marked as of this resume.
    known = {key: value for key, value in start_record(data_fingerprint).items() if key not in recorded}
    resumes = recorded.get("resumed") if isinstance(recorded.get("resumed"), list) else []
    resumes.append({"at": utc_now(), "command": command_line(), "host": host()})
    write_atomic(path, json.dumps({**known, **recorded, "resumed": resumes}, indent=2))


def read_metadata(run_dir: Path) -> dict[str, Any]:
    """What metadata.json holds; {} without one (a run from before it existed) or, with a warning, when unreadable."""
    path = Path(run_dir) / METADATA
    if not path.exists():
        return {}
    try:
        recorded = json.loads(path.read_text())
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict):  # only damage from outside: the run's figures do not depend on it
        logging.getLogger("flwr").warning("%s is not a JSON object: the run's origin is not known", path)
        return {}
    return recorded


def start_record(data_fingerprint: str) -> dict[str, Any]:
    """A new run's origin, as metadata.json holds it."""
    config_file = _CONFIG_FILES[-1] if _CONFIG_FILES else None
    return {
        "config_file": str(config_file) if config_file else None,
        "git": git_state(config_file.parent) if config_file else None,
        "command": command_line(),
        "started_at": utc_now(),
        "host": host(),
        "data_fingerprint": data_fingerprint,
    }


# Command-line options whose value is a secret: Flower's ServerApp process gets its SuperLink
# token so; it must not land in summary.json, nor in a tracker's copy of it.
SECRET_OPTIONS = ("--token",)


def command_line() -> list[str]:
    """This process's command line, with the values of secret options replaced."""
    args, hidden = list(sys.argv), False
    for index, arg in enumerate(args):
        if hidden:
            args[index], hidden = "<hidden>", False
        elif arg in SECRET_OPTIONS:
            hidden = True
        elif arg.startswith(tuple(f"{option}=" for option in SECRET_OPTIONS)):
            args[index] = arg.split("=", 1)[0] + "=<hidden>"
    return args


def utc_now() -> str:
    """The time now, ISO 8601 in UTC, to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def git_state(folder: Path) -> dict[str, Any] | None:
    """The commit checked out in the repository holding `folder`, and whether its tree has changes
    (None where that cannot be told in time); None outside a repository, without git, or too slow."""
    commit = _git(folder, "rev-parse", "HEAD")
    if commit is None:
        return None
    changes = _git(folder, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if changes is None else bool(changes)}


def _git(folder: Path, *args: str) -> str | None:
    """git's output for `args` run in `folder`, or None if it fails, is missing or takes over GIT_SECONDS."""
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=GIT_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def host() -> dict[str, Any]:
    """The machine: platform, CPU model and count, its GPUs (by nvidia-smi: asking torch would
    start CUDA in this process, taking GPU memory the client actors count on)."""
    return {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(), "gpus": gpu_names()}


def gpu_names() -> list[str]:
    """The GPUs' names as nvidia-smi lists them; [] without NVIDIA GPUs or nvidia-smi."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=GIT_SECONDS
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; elsewhere what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def data_fingerprint(task: FederatedTask) -> str:
    """sha256 over the task's class names, every client's share in client order and the held-out
    split (texts and labels, or instruction examples and categories), one part at a time."""
    digest = hashlib.sha256(json.dumps(task.class_names).encode())
    for part in (*task.partitions, task.test):
        digest.update(json.dumps(dataclasses.asdict(part), ensure_ascii=False).encode())
    return digest.hexdigest()
