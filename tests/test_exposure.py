"""Nothing listens beyond loopback unless asked (issue 14).

A local simulation: the listening sockets of Ray's GCS, raylet, agents, workers and of the
driver itself, read from the running processes. A deployment: the SuperLink serves each API on
its own address, the Control API and the Runtime API on loopback unless asked; a Control API call
that reaches the SuperNodes' address is refused; the state file is its owner's only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from fedlora.certificates import write_certificates, write_supernode_key
from fedlora.results import RoundRecord
from fedlora.simulation import RAY_SINGLE_MACHINE_ENV, backend_config, local_ray_on_loopback, simulate
from fedlora.superlink import (
    CONTROL,
    DEFAULT_CONTROL_ADDRESS,
    FLEET,
    OPEN_PATHS,
    PATHS,
    RUNTIME,
    ApiGate,
    SuperLinkError,
    database_path,
    plan_listeners,
    secure_database,
    superlink_app,
)
from tests.conftest import run_cli, tiny_config


@dataclass(frozen=True)
class Listener:
    """A socket that accepts connections (TCP, listening) or datagrams (UDP, bound)."""

    pid: int
    process: str
    kind: str
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.process} (pid {self.pid}) {self.kind} {self.ip}:{self.port}"


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or IPv4 loopback seen through an IPv6 socket (::ffff:127.0.0.1)."""
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def listeners(root: psutil.Process) -> set[Listener]:
    """Every listening TCP socket and bound UDP socket of `root` and all its descendants."""
    found: set[Listener] = set()
    for process in [root, *root.children(recursive=True)]:
        try:
            name = process.name()
            connections = process.net_connections(kind="inet")
        except psutil.Error:  # ended meanwhile
            continue
        for connection in connections:
            tcp = connection.type == socket.SOCK_STREAM
            if (tcp and connection.status == psutil.CONN_LISTEN) or (not tcp and connection.laddr):
                found.add(Listener(process.pid, name, "tcp" if tcp else "udp", connection.laddr.ip, connection.laddr.port))
    return found


def test_loopback_is_told_apart_from_every_other_address() -> None:
    assert all(is_loopback(ip) for ip in ("127.0.0.1", "127.0.1.1", "::1", "::ffff:127.0.0.1"))
    assert not any(is_loopback(ip) for ip in ("0.0.0.0", "::", "192.0.2.2", "fd00::2", "::ffff:10.0.0.1", "fe80::1%eth0"))


def test_a_local_ray_runs_without_its_dashboard_and_a_cluster_keeps_its_own_settings() -> None:
    assert backend_config(tiny_config())["init_args"]["include_dashboard"] is False
    cluster = backend_config(tiny_config("federation.ray_address='ray://head:10001'"))["init_args"]
    assert cluster["address"] == "ray://head:10001" and "include_dashboard" not in cluster


@pytest.mark.e2e
@pytest.mark.usefixtures("own_ray")
def test_a_local_simulation_listens_on_loopback_only(tmp_path: Path) -> None:
    seen: set[Listener] = set()

    def look(record: RoundRecord) -> None:  # in the driver, while Ray and its workers run
        seen.update(listeners(psutil.Process()))

    simulate(tiny_config(), tmp_path / "run", on_round=look)
    # The test must see the processes the issue names, or it proves nothing.
    processes = {listener.process for listener in seen}
    assert {"gcs_server", "raylet"} <= processes, sorted(map(str, seen))
    assert any(listener.pid == psutil.Process().pid for listener in seen), "the driver's own sockets were not seen"
    wide = sorted(str(listener) for listener in seen if not is_loopback(listener.ip))
    assert not wide, "listening beyond loopback:\n" + "\n".join(wide)


def test_the_loopback_switch_holds_for_a_local_run_only_and_is_put_back_after() -> None:
    from ray._private import ray_constants

    before = (os.environ.get(RAY_SINGLE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER)
    with local_ray_on_loopback(tiny_config()):
        assert os.environ[RAY_SINGLE_MACHINE_ENV] == "0" and ray_constants.ENABLE_RAY_CLUSTER is False
    assert (os.environ.get(RAY_SINGLE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER) == before
    with local_ray_on_loopback(tiny_config("federation.ray_address='ray://head:10001'")):
        assert (os.environ.get(RAY_SINGLE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER) == before


# --- deployment: which API answers on which address ---------------------------------------------


def test_the_control_and_runtime_apis_stay_on_loopback_unless_asked() -> None:
    listeners = {listener.apis: listener for listener in plan_listeners("0.0.0.0:9092", DEFAULT_CONTROL_ADDRESS, 9091)}
    assert listeners[frozenset({FLEET})].address == "0.0.0.0:9092"
    assert listeners[frozenset({CONTROL})].address == "127.0.0.1:9093"
    assert listeners[frozenset({RUNTIME})].address == "127.0.0.1:9091"
    # Asked: the Control API on the Fleet API's own socket, or an address of its own.
    (shared, runtime) = plan_listeners("[fd00::2]:9092", "[fd00::2]:9092", 9091)
    assert shared.apis == {FLEET, CONTROL} and shared.address == "[fd00::2]:9092" and runtime.apis == {RUNTIME}
    assert {listener.address for listener in plan_listeners("10.0.0.5:9092", "10.0.0.5:9093", 9091)} == {
        "10.0.0.5:9092",
        "10.0.0.5:9093",
        "127.0.0.1:9091",
    }


@pytest.mark.parametrize(
    "fleet, control, runtime_port, message",
    [
        ("0.0.0.0:9092", "127.0.0.1:9092", 9091, "different hosts"),  # 0.0.0.0 would take the Control API's connections
        ("127.0.0.1:9091", DEFAULT_CONTROL_ADDRESS, 9091, "--runtime-port 9091"),
        ("server.lan", DEFAULT_CONTROL_ADDRESS, 9091, "--fleet-address 'server.lan': expected HOST:PORT"),
        ("0.0.0.0:9092", "127.0.0.1:99999", 9091, "--control-address"),
    ],
)
def test_addresses_that_would_mix_the_apis_are_refused(fleet: str, control: str, runtime_port: int, message: str) -> None:
    with pytest.raises(SuperLinkError, match=re.escape(message)):
        plan_listeners(fleet, control, runtime_port)


def test_each_socket_answers_only_for_its_apis_and_refuses_the_rest_with_403() -> None:
    listeners = plan_listeners("0.0.0.0:9092", DEFAULT_CONTROL_ADDRESS, 9091)
    served: list[str] = []

    async def app(scope, receive, send) -> None:
        served.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    gate = ApiGate(app, listeners)

    def status(port: int, path: str) -> int:
        replies: list[dict] = []

        async def send(message: dict) -> None:
            replies.append(message)

        async def receive() -> dict:
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "path": path, "server": ("192.0.2.2", port), "client": ("192.0.2.9", 50000)}
        asyncio.run(gate(scope, receive, send))
        return replies[0]["status"]

    assert status(9092, "/v1/fleet/pull-messages") == 200
    assert status(9092, "/v1/control/register-node") == 403  # the attacks of issue 14, on the SuperNodes' port
    assert status(9092, "/v1/control/list-runs") == 403 and status(9092, "/v1/control/stop-run") == 403
    assert status(9092, "/v1/runtime/pull-task-input") == 403
    assert status(9092, "/v1/fleetx") == 403 and status(9092, "/docs") == 403
    assert status(9093, "/v1/control/list-runs") == 200 and status(9093, "/v1/fleet/pull-messages") == 403
    assert status(9091, "/v1/runtime/pull-task-input") == 200 and status(9091, "/v1/control/start-run") == 403
    assert all(status(port, "/health") == 200 for port in (9091, 9092, 9093))
    assert "/v1/control/register-node" not in served


def test_the_state_file_is_created_or_corrected_for_its_owner_only(tmp_path: Path) -> None:
    new = tmp_path / "new" / "superlink.db"
    assert secure_database(new) == []
    assert stat.S_IMODE(new.stat().st_mode) == 0o600 and stat.S_IMODE(new.parent.stat().st_mode) == 0o700
    old = tmp_path / "superlink.db"
    for file in (old, tmp_path / "superlink.db-wal"):
        file.write_bytes(b"")
        file.chmod(0o644)
    assert secure_database(old) == [old, tmp_path / "superlink.db-wal"]
    assert {stat.S_IMODE(f.stat().st_mode) for f in tmp_path.glob("superlink.db*")} == {0o600}
    assert database_path(":flwr-in-memory:") is None and database_path("sqlite:///x/s.db") == Path("x/s.db")
    with pytest.raises(SuperLinkError, match="--database"):
        database_path("postgresql://db/flwr")


def test_a_dry_run_creates_nothing_and_the_old_flags_say_what_replaced_them(tmp_path: Path) -> None:
    write_certificates(tmp_path / "certs", [])
    before = sorted(tmp_path.rglob("*"))
    superlink = ["deploy", "superlink", "--certs", str(tmp_path / "certs")]
    state = ["--database", str(tmp_path / "deploy" / "superlink.db")]
    code, output = run_cli(*superlink, "--fleet-address", "10.1.2.3:9092", *state, "--dry-run")
    assert code == 0 and "--control-address 127.0.0.1:9093" in output and "warning" not in output
    assert sorted(tmp_path.rglob("*")) == before  # no deploy/ folder, no state file
    code, output = run_cli(*superlink, "--dry-run")
    assert code == 2 and "--fleet-address" in output  # no default: the operator names it
    code, output = run_cli(*superlink, "--host", "0.0.0.0", "--dry-run")
    assert code == 2 and "--host and --port are gone" in output and "Traceback" not in output
    code, output = run_cli(*superlink, "--fleet-address", "10.1.2.3:9092", "--dry-run", "--", "--port", "1")
    assert code == 2 and "--port: not with this launcher" in output
    code, output = run_cli(*superlink, "--fleet-address", "10.1.2.3:9092", "--control-address", "0.0.0.0:9093", "--dry-run")
    assert code == 0 and "warning" in output and "run code on this server" in output


def outside_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (what another host would connect to)."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not is_loopback(address.address):
                return address.address
    return None


def accepts(host: str, port: int) -> bool:
    """Whether a TCP connection to host:port is accepted."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(5)
        return probe.connect_ex((host, port)) == 0


@dataclass
class ExposedSuperLink:
    """Two SuperLinks started through `fedlora deploy superlink`, with the Fleet API on this
    machine's outside address: one with the Control API left to its loopback default, one asked
    to serve it outside (--control-address)."""

    outside: str
    fleet_port: int
    control_port: int
    remote_control_port: int
    listeners: set[Listener]
    remote_listeners: set[Listener]
    launch_output: str
    remote_launch_output: str
    database: Path
    intruder: subprocess.CompletedProcess[str]
    inside_listing: subprocess.CompletedProcess[str]
    remote_listing: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExposedSuperLink]:
    from tests.test_deploy import Processes, deployment_env, fedlora, free_port, node_env, wait_for

    outside = outside_address()
    if outside is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect to")
    root = tmp_path_factory.mktemp("exposed")
    certs = root / "certs"
    write_certificates(certs, ["localhost", outside], days=1)
    intruder = write_supernode_key(root / "keys", "intruder")
    database = root / "state" / "superlink.db"
    database.parent.mkdir()
    database.write_bytes(b"")  # an existing state file, readable by everyone as issue 14 found it
    database.chmod(0o644)
    env = deployment_env(root)
    cli_env = node_env(env, root / "home-cli")
    fleet_port, control_port, remote_fleet_port, remote_control_port = (free_port() for _ in range(4))
    processes = Processes(root)

    def superlink(name: str, fleet: str, control: str, state: str, ready: tuple[str, int]) -> psutil.Process:
        """Start `fedlora deploy superlink`; return once its Control API accepts connections at `ready`."""
        launched = processes.start(
            name,
            fedlora(
                "deploy",
                "superlink",
                "--certs",
                str(certs),
                "--fleet-address",
                fleet,
                "--control-address",
                control,
                "--runtime-port",
                str(free_port()),
                "--database",
                state,
            ),  # fmt: skip
            node_env(env, root / f"home-{name}"),
            root,
        )
        wait_for(lambda: accepts(*ready) or launched.poll() is not None, 60, f"the SuperLink {name}")
        assert launched.poll() is None, processes.log(name)
        return psutil.Process(launched.pid)

    def connection(name: str, address: str) -> None:
        subprocess.run(
            fedlora("deploy", "connection", "--name", name, "--address", address, "--ca", str(certs / "ca.crt"), "--no-default"),
            env=cli_env,
            cwd=root,
            check=True,
            capture_output=True,
        )

    def flwr_nodes(name: str) -> subprocess.CompletedProcess[str]:
        flwr = str(Path(sys.executable).parent / "flwr")
        command = [flwr, "supernode", "list", name, "--format", "json"]
        return subprocess.run(command, env=cli_env, cwd=root, capture_output=True, text=True, timeout=120, check=False)

    try:
        link = superlink(
            "superlink", f"{outside}:{fleet_port}", f"127.0.0.1:{control_port}", str(database), ("127.0.0.1", control_port)
        )
        remote = superlink(
            "superlink-remote",
            f"127.0.0.1:{remote_fleet_port}",
            f"{outside}:{remote_control_port}",
            ":flwr-in-memory:",
            (outside, remote_control_port),
        )
        time.sleep(2)  # the SuperExecs start after the sockets
        connection("inside", f"127.0.0.1:{control_port}")
        connection("outside", f"{outside}:{fleet_port}")  # an outsider who reaches the SuperNodes' port
        connection("remote", f"{outside}:{remote_control_port}")
        intruder_attempt = subprocess.run(
            fedlora("deploy", "register", str(intruder.public), "--connection", "outside"),
            env=cli_env,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        exposed = ExposedSuperLink(
            outside=outside,
            fleet_port=fleet_port,
            control_port=control_port,
            remote_control_port=remote_control_port,
            listeners=listeners(link),
            remote_listeners=listeners(remote),
            launch_output=processes.log("superlink"),
            remote_launch_output=processes.log("superlink-remote"),
            database=database,
            intruder=intruder_attempt,
            inside_listing=flwr_nodes("inside"),
            remote_listing=flwr_nodes("remote"),
        )
    finally:
        processes.stop()
    yield exposed


@pytest.mark.deploy
def test_only_the_fleet_api_listens_beyond_loopback(exposed: ExposedSuperLink) -> None:
    wide = {f"{listener.ip}:{listener.port}" for listener in exposed.listeners if not is_loopback(listener.ip)}
    assert wide == {f"{exposed.outside}:{exposed.fleet_port}"}, sorted(map(str, exposed.listeners))
    assert any(listener.port == exposed.control_port and listener.ip == "127.0.0.1" for listener in exposed.listeners)
    assert not accepts(exposed.outside, exposed.control_port)  # nothing there for an outsider to reach


@pytest.mark.deploy
def test_a_control_api_call_from_outside_is_refused_and_from_loopback_served(exposed: ExposedSuperLink) -> None:
    attempt = exposed.intruder.stdout + exposed.intruder.stderr
    assert exposed.intruder.returncode == 1 and "not registered" in attempt and "403" in attempt, attempt
    listing = exposed.inside_listing
    assert listing.returncode == 0, listing.stdout + listing.stderr
    reply = json.loads(listing.stdout[listing.stdout.index("{") :])
    assert reply["success"] and reply["nodes"] == [], reply  # loopback works, and the intruder's key is not there
    # The SuperLink's access log names the outside peer it refused.
    assert re.search(
        rf"{re.escape(exposed.outside)}:\d+ - \"POST /v1/control/register-node HTTP/1.1\" 403", exposed.launch_output
    )


@pytest.mark.deploy
def test_asked_to_the_control_api_serves_outside(exposed: ExposedSuperLink) -> None:
    wide = {f"{listener.ip}:{listener.port}" for listener in exposed.remote_listeners if not is_loopback(listener.ip)}
    assert wide == {f"{exposed.outside}:{exposed.remote_control_port}"}
    listing = exposed.remote_listing
    assert listing.returncode == 0 and json.loads(listing.stdout[listing.stdout.index("{") :])["success"], listing.stderr


@pytest.mark.deploy
def test_the_state_file_with_the_task_tokens_is_its_owners_only(exposed: ExposedSuperLink) -> None:
    assert f"{exposed.database} was readable by others: now 0600" in exposed.launch_output
    files = sorted(exposed.database.parent.glob("superlink.db*"))
    assert exposed.database in files
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: 0o600 for f in files}


def test_flwrs_own_superlink_app_is_built_behind_the_gate_with_the_runtime_api_on_loopback(tmp_path: Path) -> None:
    from fastapi import FastAPI

    files = write_certificates(tmp_path, [])
    listeners = plan_listeners("0.0.0.0:19092", "127.0.0.1:19093", 19091)
    flower_args = ["--ssl-ca-certfile", str(files.ca_cert), "--ssl-certfile", str(files.server_cert)]
    flower_args += ["--ssl-keyfile", str(files.server_key), "--enable-supernode-auth", "--database", ":flwr-in-memory:"]
    argv = list(sys.argv)
    app, config = superlink_app(listeners, flower_args, 19091)
    assert sys.argv == argv
    assert isinstance(app, ApiGate) and isinstance(app.app, FastAPI)
    paths = set(app.app.openapi()["paths"])  # every route flwr serves: each under one API's prefix, or open
    assert {"/v1/control/register-node", "/v1/fleet/pull-messages", "/v1/runtime/pull-task-input"} <= paths
    prefixes = tuple(prefix + "/" for prefix in PATHS.values())
    assert all(path in OPEN_PATHS or path.startswith(prefixes) for path in paths), sorted(paths)
    assert (config.host, config.port, config.enable_supernode_auth, config.certificates is not None) == (
        "127.0.0.1",
        19091,
        True,
        True,
    )
