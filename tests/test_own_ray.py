"""A local run is local (issue 24, case 10; the issue's acceptance 4).

`ray start --head` leaves its cluster's address where `ray.init()` without an address looks
(RAY_ADDRESS, and ray_current_cluster in Ray's temp dir): a simulation without
`federation.ray_address` must start a Ray of its own all the same, and go on doing so once that
cluster's processes are killed (the address still written, the GCS dead: `ray.init()` would wait
for it forever). A SIGTERM while the engine starts ends the run within seconds with exit code 130.

Every Ray here lives under one short temporary folder (RAY_TMPDIR: Ray's socket paths must stay
under ~107 characters); every process whose command line names it is killed at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from fedlora.config import load_config
from fedlora.results import RoundRecord, read_summary
from fedlora.simulation import RAY_SINGLE_MACHINE_ENV, backend_config, local_ray_on_loopback, simulate
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "simulations" / "deploy_tiny.toml"
# One round, and one client actor whatever the machine (a client asks for every CPU).
FAST = ["federation.rounds=1", f"federation.client_cpus={os.cpu_count() or 1}"]


@dataclass
class Cluster:
    """A Ray cluster started with `ray start --head` under `root` (RAY_TMPDIR)."""

    root: Path
    port: int
    processes: list[psutil.Process]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """An environment in which Ray's discovery finds this cluster, both ways it looks."""
        return {**os.environ, "RAY_TMPDIR": str(self.root), "RAY_ADDRESS": self.address}

    def kill(self) -> None:
        """SIGKILL every process of the cluster (no `ray stop`: its address stays where Ray looks)."""
        for process in self.processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(self.processes, timeout=10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def processes_under(root: Path) -> list[psutil.Process]:
    """The processes whose command line names `root` (every Ray process started under it does)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if str(root) in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="fl-ray-", dir="/tmp"))
    port = free_port()
    env = {**os.environ, "RAY_TMPDIR": str(root), RAY_SINGLE_MACHINE_ENV: "0"}  # on loopback
    env.pop("RAY_ADDRESS", None)
    ports = {flag: str(free_port()) for flag in ("--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port")}
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--port", str(port), "--disable-usage-stats"]
    command += ["--num-cpus", str(os.cpu_count() or 1), "--include-dashboard", "false"]
    command += [item for pair in ports.items() for item in pair]
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        assert (root / "ray" / "ray_current_cluster").read_text().strip().endswith(f":{port}")
        yield Cluster(root, port, processes_under(root))
    finally:
        for process in processes_under(root):
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(root, ignore_errors=True)


def start_simulation(cluster: Cluster, run_dir: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "fedlora.cli", "simulate", str(CONFIG), "--out", str(run_dir)]
    command += [item for override in FAST for item in ("--set", override)]
    return subprocess.Popen(command, cwd=ROOT, env=cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def end(process: subprocess.Popen, helpers: list[psutil.Process] = ()) -> None:
    """Kill what is left of a simulation and the processes it started."""
    for leftover in [*helpers, process]:
        try:
            leftover.kill()
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    process.wait(timeout=30)


def test_without_a_ray_address_ray_init_starts_ray_here_and_ray_address_is_hidden_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert backend_config(tiny_config())["init_args"]["address"] == "local"  # Ray: start a new instance, never discover
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    with local_ray_on_loopback(tiny_config()):
        assert "RAY_ADDRESS" not in os.environ  # Ray's own processes do not see it either
    assert os.environ["RAY_ADDRESS"] == "127.0.0.1:6379"
    with local_ray_on_loopback(tiny_config("federation.ray_address='ray://head:10001'")):
        assert os.environ["RAY_ADDRESS"] == "127.0.0.1:6379"


@pytest.mark.e2e
@pytest.mark.usefixtures("own_ray")  # Ray started by the runs themselves, as from the command line
def test_with_a_cluster_running_a_simulation_starts_a_ray_of_its_own(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_TMPDIR", str(cluster.root))
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    seen: list[str] = []

    def look(record: RoundRecord) -> None:  # in the driver, while the run's Ray is up
        import ray

        seen.append(ray.get_runtime_context().gcs_address)

    simulate(load_config(CONFIG, FAST), tmp_path / "run", on_round=look)
    assert seen and not any(address.endswith(f":{cluster.port}") for address in seen), (seen, cluster.address)
    assert all(process.is_running() for process in cluster.processes)  # the cluster was left alone
    assert os.environ["RAY_ADDRESS"] == cluster.address  # and so was the user's environment


@pytest.mark.e2e
@pytest.mark.usefixtures("own_ray")  # Ray started by the runs themselves, as from the command line
def test_with_the_cluster_killed_the_next_simulation_still_starts_and_finishes(cluster: Cluster, tmp_path: Path) -> None:
    cluster.kill()
    process = start_simulation(cluster, tmp_path / "run")
    try:
        output, _ = process.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        end(process, psutil.Process(process.pid).children(recursive=True))
        pytest.fail("the simulation did not finish within 400 s (waiting for the dead cluster?)")
    assert process.returncode == 0, output
    assert read_summary(tmp_path / "run")["status"] == "finished"


@pytest.mark.e2e
@pytest.mark.usefixtures("own_ray")  # Ray started by the runs themselves, as from the command line
def test_a_sigterm_while_the_engine_starts_ends_the_run_in_seconds(cluster: Cluster, tmp_path: Path) -> None:
    """With the dead cluster's address still where Ray looks: the worst case of the issue."""
    cluster.kill()
    run_dir = tmp_path / "run"
    process = start_simulation(cluster, run_dir)
    started = psutil.Process(process.pid)
    helpers: list[psutil.Process] = []
    try:
        # Wait for the run's own Ray to be starting (its GCS up), or at worst 120 s.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            helpers = started.children(recursive=True)
            if any(helper.name() == "gcs_server" for helper in helpers):
                break
            time.sleep(0.2)
        assert process.poll() is None, process.stdout.read()
        asked = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("a SIGTERM before the first round did not end the run within 20 s")
        took = time.monotonic() - asked
        _, alive = psutil.wait_procs(helpers, timeout=15)  # Ray's processes share the driver's fate
    finally:
        end(process, helpers)
    assert process.returncode == 130, output
    assert "SIGTERM before the first round" in output and "Traceback" not in output, output
    assert took < 20
    assert not alive, f"left running: {alive}"
    assert not run_dir.exists(), "a new run stopped before its first round leaves no directory behind"
