"""`flwr run . local` with Flower's defaults: its own local SuperLink, a federation of 2 SuperNodes.

Each test runs Flower's CLI as a user would, against a local SuperLink of its own (a private
FLWR_HOME and ports, so no other SuperLink on the machine is touched), which it stops after.
Flower's runtime dependency installation (`uv sync` of the app for every run) is switched off:
the project's dependencies are this environment's, and there is no network to install from.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from fedlora.config import ConfigError
from fedlora.results import read_history, read_summary
from fedlora.server import FederationError
from fedlora.server_app import OneLineErrors

pytestmark = pytest.mark.e2e
APP_DIR = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 600.0  # one `flwr run` of the tiny experiment: about 50 s on two idle cores
# The mismatch is found as soon as the ServerApp runs: within MISMATCH_AFTER_START seconds of its
# first line (before it, Flower's CLI, SuperLink and simulation process start and the app's modules
# load: 20 to 50 s on two shared cores, most of it importing torch and transformers); the whole
# command ends far below the 600 s a deployment waits for its SuperNodes.
MISMATCH_AFTER_START = 10.0
WHOLE_COMMAND_DEADLINE = 120.0
FITS_DEFAULTS = "federation.num_clients=2;federation.clients_per_round=2"


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class FlowerHome:
    """A private Flower state (FLWR_HOME), the environment `flwr` runs in, and the folder it runs from."""

    path: Path
    env: dict[str, str]
    workdir: Path  # where the first `flwr run` starts the local SuperLink: relative run-dirs land here

    def stop_superlink(self) -> None:
        """Stop the local SuperLink `flwr run` started for this home, and every process under it."""
        found = []
        for process in psutil.process_iter(["cmdline"]):
            command = " ".join(process.info["cmdline"] or [])
            if "flower-superlink" in command and str(self.path) in command:
                found.append(process)
                found.extend(process.children(recursive=True))
        for process in found:
            try:
                process.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(found, timeout=15)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture(scope="module")
def flower_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerHome]:
    home = tmp_path_factory.mktemp("flwr-home")
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    flower = FlowerHome(home, env, tmp_path_factory.mktemp("workdir"))
    yield flower
    flower.stop_superlink()


@dataclass
class FlwrRun:
    """What one `flwr run --stream` printed, and when each line came."""

    lines: list[tuple[float, str]]
    exit_code: int | None

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, pattern: str) -> tuple[float, str] | None:
        """The first line matching `pattern`, with its time since the command started."""
        return next(((at, line) for at, line in self.lines if re.search(pattern, line)), None)


def flwr_run(flower: FlowerHome, run_config: str, stop_on: str | None = None) -> FlwrRun:
    """`flwr run <app> local --run-config ... --stream` from the work folder; with `stop_on`, stop
    following the run once a line matches."""
    command = [str(Path(sys.executable).parent / "flwr"), "run", str(APP_DIR), "local", "--run-config", run_config, "--stream"]
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=flower.workdir, env=flower.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    timer = threading.Timer(RUN_TIMEOUT, process.kill)
    timer.start()
    lines: list[tuple[float, str]] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append((time.monotonic() - started, re.sub(r"\x1b\[[0-9;]*m", "", line.rstrip())))
            if stop_on and re.search(stop_on, line):
                process.terminate()
                break
        process.wait(timeout=30)
    finally:
        timer.cancel()
        if process.poll() is None:
            process.kill()
    return FlwrRun(lines, process.returncode)


def test_the_default_federation_runs_the_tiny_experiment_to_its_adapter_and_report(flower_home: FlowerHome) -> None:
    run = flwr_run(flower_home, f"experiment='simulations/deploy_tiny.toml' overrides='{FITS_DEFAULTS}'")
    run_dir = flower_home.workdir / "runs" / "deploy-tiny"  # run-dir "runs": from where the local SuperLink started
    assert (run_dir / "summary.json").exists(), run.text
    summary = read_summary(run_dir)
    assert summary["status"] == "finished" and summary["num_clients"] == 2 and summary["rounds"] == 2
    assert [line["round"] for line in read_history(run_dir)] == [0, 1, 2]
    assert (run_dir / "adapter" / "adapter_config.json").exists() and (run_dir / "adapter" / "base" / "config.json").exists()
    assert (run_dir / "report" / "report.html").exists()
    for server_round in range(3):  # one line a round: no second copy through another logging handler
        assert len(re.findall(rf"round {server_round}: accuracy", run.text)) == 1, run.text
    assert f"run directory: {run_dir.resolve()}" in run.text
    assert f"report: {(run_dir / 'report' / 'report.html').resolve()}" in run.text


def test_a_federation_of_another_size_is_one_line_as_soon_as_the_server_app_runs(flower_home: FlowerHome) -> None:
    name = "output.name='too-few-nodes'"
    run = flwr_run(flower_home, f"experiment='simulations/deploy_tiny.toml' overrides=\"{name}\"")
    found, started = run.first("SuperNodes but the experiment"), run.first("run directory: ")
    assert found is not None and started is not None, run.text
    seconds, line = found
    assert seconds - started[0] < MISMATCH_AFTER_START and seconds < WHOLE_COMMAND_DEADLINE, run.text
    print(
        f"\nmismatch line {seconds:.1f} s after `flwr run` started, {seconds - started[0]:.1f} s after the ServerApp's first line"
    )
    assert "ERROR" in line and "has 2 SuperNodes" in line and "federation.num_clients = 3" in line
    assert '--federation-config "num-supernodes=3"' in line and FITS_DEFAULTS in line
    assert not (flower_home.workdir / "runs" / "too-few-nodes" / "summary.json").exists()
    # Flower's own line says the run failed, without a traceback after the line that explains it.
    assert run.first(r"raised an exception \(the line above says what to change\)") is not None and "Traceback" not in run.text, (
        run.text
    )


@pytest.mark.parametrize(
    ("error", "traceback_kept"),
    [(ConfigError("federation.rounds: 0 is below 1"), False), (FederationError("too few nodes"), False), (KeyError("x"), True)],
)
def test_flowers_traceback_is_dropped_only_for_an_error_already_explained_in_one_line(error, traceback_kept) -> None:
    try:
        raise error
    except Exception:
        record = logging.LogRecord("flwr", logging.ERROR, __file__, 1, "ServerApp raised an exception", (), sys.exc_info())
    assert OneLineErrors().filter(record)
    assert (record.exc_info is not None) == traceback_kept
    assert logging.Formatter().format(record).count("Traceback") == int(traceback_kept)
