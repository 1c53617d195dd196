"""Checkpoint and resume after a killed server; client crashes and silences cost only their update."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from clients.app import client_id_of, handle_query, handle_train
from fedlora.checkpoint import load_checkpoint
from fedlora.results import CHECKPOINT, HISTORY, read_history, read_summary
from fedlora.server import build_server_app
from fedlora.simulation import backend_config, simulate
from tests.conftest import run_cli, tiny_config, without_timings

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_ray")]

ROOT = Path(__file__).resolve().parent.parent
# DP on, so that resuming must also carry every client's privacy ledger across the restart. The
# noise is calibrated for one round more than the run has: the round the kill interrupts is
# charged again on resume (its clients may have trained), and the run must still afford it.
RESUME_RUN = (
    "federation.rounds=4",
    "federation.local_steps=12",
    "privacy.enabled=true",
    "privacy.epsilon=8.0",
    "privacy.planned_rounds=5",
)
PRIVACY_FIGURES = ("epsilon_max", "epsilon_mean")


def start_server_process(run_dir: Path) -> subprocess.Popen:
    """The simulation (server, and Ray under it) in its own process group, which we can kill."""
    code = (
        "import sys; from tests.conftest import tiny_config; from fedlora.simulation import simulate; "
        f"simulate(tiny_config(*{RESUME_RUN!r}), sys.argv[1])"
    )
    return subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=ROOT, start_new_session=True)


def wait_for_round(run_dir: Path, wanted: int, process: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / HISTORY).exists() and any(r["round"] >= wanted for r in read_history(run_dir)):
            return
        assert process.poll() is None, "the server process ended before the round was recorded"
        time.sleep(0.05)
    raise TimeoutError(f"round {wanted} was not recorded within {timeout:.0f} s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The resume tests' run, uninterrupted: what a stopped and resumed run must end with."""
    reference = tmp_path_factory.mktemp("resume") / "uninterrupted"
    simulate(tiny_config(*RESUME_RUN), reference)
    return reference


def test_killed_server_resumes_to_the_same_history(tmp_path: Path, uninterrupted: Path) -> None:
    reference = uninterrupted
    run_dir = tmp_path / "killed"
    process = start_server_process(run_dir)
    try:
        wait_for_round(run_dir, 2, process)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    checkpoint = load_checkpoint(run_dir)
    # Round 2's history line is written before its checkpoint: a kill between the two leaves the
    # checkpoint at round 1 (and round 2 in flight), which resume must handle as well.
    assert 1 <= checkpoint.round < 4 and not (run_dir / "summary.json").exists()
    interrupted = set(checkpoint.in_flight)  # asked to train in the round the kill cut short

    code, output = run_cli("simulate", "--resume", str(run_dir))  # in this process: the shared Ray is warm
    assert code == 0, output
    report = run_dir / "report" / "report.html"
    assert report.is_file() and str(report) in output.replace("\n", "")  # the CLI says where its report is
    assert (run_dir / CHECKPOINT).exists()
    # The same rounds, clients and accuracies; epsilon is higher by the interrupted round's steps.
    ours, theirs = read_history(run_dir), read_history(reference)
    assert without_timings(ours, PRIVACY_FIGURES) == without_timings(theirs, PRIVACY_FIGURES)
    ours_summary, theirs_summary = read_summary(run_dir), read_summary(reference)
    for client, figures in theirs_summary["privacy"].items():
        extra = 12 if int(client) in interrupted else 0
        assert ours_summary["privacy"][client]["dp-steps"] == figures["dp-steps"] + extra
        assert ours_summary["privacy"][client]["epsilon"] >= figures["epsilon"]
        assert ours_summary["privacy"][client]["epsilon"] <= 8.0 + 1e-9
    assert ours_summary["final_accuracy"] == theirs_summary["final_accuracy"]


def faulty_client_app(config, crashing: int, silent: int, silence: float) -> ClientApp:
    """Our ClientApp, except that one client raises and another answers only after the timeout."""
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return handle_query(message, context, config)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        client = client_id_of(context)
        if client == crashing:
            raise RuntimeError("simulated crash")
        if client == silent:
            time.sleep(silence)
        return handle_train(message, context, config)

    return app


def test_a_crash_and_a_silent_client_cost_their_updates_not_the_run(tmp_path: Path) -> None:
    config = tiny_config(
        "federation.num_clients=4",
        "federation.clients_per_round=4",
        "federation.min_replies=2",
        "federation.round_timeout=5.0",
        "federation.client_cpus=0.5",
    )
    errors: list[BaseException] = []
    run_simulation(
        server_app=build_server_app(config, tmp_path / "run", errors=errors),
        client_app=faulty_client_app(config, crashing=1, silent=2, silence=7.0),
        num_supernodes=4,
        backend_config=backend_config(config),
    )
    assert not errors
    history = read_history(tmp_path / "run")
    assert read_summary(tmp_path / "run")["status"] == "finished"
    for record in history[1:]:
        assert record["clients"] == [0, 3] and not record["skipped"]
        reasons = {r["client"]: r["reason"] for r in record["rejected"]}
        assert set(reasons) == {1, 2}
        assert "simulated crash" in reasons[1]
        assert reasons[2] == "no reply before the round timeout"


def test_a_round_below_the_minimum_is_skipped_and_the_run_goes_on(tmp_path: Path) -> None:
    config = tiny_config("federation.num_clients=3", "federation.clients_per_round=3", "federation.min_replies=3")
    errors: list[BaseException] = []
    run_simulation(
        server_app=build_server_app(config, tmp_path / "run", errors=errors),
        client_app=faulty_client_app(config, crashing=0, silent=-1, silence=0.0),
        num_supernodes=3,
        backend_config=backend_config(config),
    )
    assert not errors
    history = read_history(tmp_path / "run")
    assert [r["skipped"] for r in history[1:]] == [True, True]
    assert history[-1]["accuracy"] == history[0]["accuracy"]  # nothing was aggregated
