"""Run directories that cannot be clobbered: one process a run, no silent overwrite, atomic files.

- `RunLock`: an exclusive lock (`fcntl.flock` on `<run_dir>/.lock`) held for the life of a run;
  a second process that wants the directory is refused with the holder's pid and command. The
  kernel drops the lock when the holder dies, so a killed run never leaves a stale lock.
- `claim_run_dir`: a directory that already holds a run is never overwritten unless asked
  (`--overwrite`); when asked, the old run's files go first, so no stale summary, adapter or
  report survives beside the new history. A non-empty directory that is not a run is refused.
- `write_atomic`: a file appears whole or not at all (temp file, fsync, rename).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO

from fedlora.config import ConfigError

LOCK = ".lock"
# What a run writes into its directory (fedlora/results.py, checkpoint.py, metadata.py, the report,
# trackers); the first four mark a directory that holds a run.
RUN_FILES = (
    "config.json",
    "history.jsonl",
    "summary.json",
    "checkpoint.pt",
    "checkpoint.partial",
    "error.txt",
    "metadata.json",
)
RUN_FOLDERS = ("adapter", "adapter.partial", "adapter-rounds", "report", "tensorboard", "mlruns", "wandb")

# Locks this process holds, by resolved path: the CLI takes a run's lock before its checks and
# the server, in the same process, finds it held instead of locking itself out.
_HELD: dict[Path, RunLock] = {}


class RunDirError(ConfigError):
    """A run directory that this run may not use (in use, or holding another run)."""


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the whole new one, never a part."""
    partial = path.with_name(path.name + ".partial")
    with partial.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


class RunLock:
    """An exclusive, process-wide lock on a run directory (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir).resolve()
        self._handle: IO[str] | None = None
        self._depth = 0
        self._outer: RunLock | None = None  # the lock object this process took first
        self._created = False  # the directory did not exist before: remove it if nothing was written

    def acquire(self) -> RunLock:
        """Take the lock, or raise RunDirError naming the process that holds it."""
        held = _HELD.get(self.run_dir)
        if held is not None:  # this process holds it already (the CLI, then its server)
            held._depth += 1
            self._outer = held
            return self
        handle = self._open_lock_file()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirError(f"{self.run_dir} is in use by {holder}; wait for it to finish or choose another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}))
        handle.flush()
        self._handle, self._depth = handle, 1
        _HELD[self.run_dir] = self
        return self

    def _open_lock_file(self) -> IO[str]:
        """The directory made (parents too) and its lock file open; RunDirError if this cannot be done here."""
        try:
            self._created = not self.run_dir.exists()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            return (self.run_dir / LOCK).open("a+")
        except OSError as err:  # a file in the way, a read-only file system, no permission, a name too long
            raise RunDirError(
                f"{self.run_dir}: cannot write a run there ({_why(err, self.run_dir)}); give a directory you can write to"
            ) from None

    def release(self) -> None:
        """Give the lock up (the outermost release of this process does)."""
        if self._outer is not None:
            self._outer.release()
            self._outer = None
            return
        self._depth -= 1
        if self._depth > 0 or self._handle is None:
            return
        _HELD.pop(self.run_dir, None)
        self._handle.seek(0)
        self._handle.truncate()
        if self._created and [p.name for p in self.run_dir.iterdir()] == [LOCK]:  # refused before writing
            shutil.rmtree(self.run_dir, ignore_errors=True)
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.release()


def make_dir(path: Path) -> None:
    """Create a directory and its parents (RunDirError, saying why, where that cannot be done)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(
            f"{path}: cannot create this directory ({_why(err, Path(path))}); give a directory you can write to"
        ) from None


def _why(err: OSError, path: Path) -> str:
    """Why `path` cannot be a directory: a file in the way, or the system's reason (read-only, no permission...)."""
    in_the_way = next((part for part in (path, *path.parents) if os.path.isfile(part)), None)
    if in_the_way is not None:
        return f"{in_the_way} is a file, not a directory"
    return err.strerror or type(err).__name__


def holds_run(run_dir: Path) -> bool:
    """Whether the directory holds (part of) a run."""
    return any((Path(run_dir) / name).exists() for name in RUN_FILES[:4])


def claim_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Make `run_dir` ready for a new run: refuse to overwrite a run unless asked, then clear it.

    Call with the run's lock held, so that nobody else is writing there meanwhile.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file, not a run directory; choose another --out")
    if holds_run(run_dir):
        if not overwrite:
            raise RunDirError(
                f"{run_dir} already holds a run: continue it with --resume {run_dir}, replace it with --overwrite, "
                "or choose another --out"
            )
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        for name in RUN_FOLDERS:
            shutil.rmtree(run_dir / name, ignore_errors=True)
        return
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)
    if foreign:
        raise RunDirError(f"{run_dir} is not empty and holds no run ({', '.join(foreign[:3])}...); choose another --out")
