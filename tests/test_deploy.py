"""Acceptance: the same apps on Flower's deployment engine, secured, on loopback.

One SuperLink and two SuperNodes run as separate processes (started through `fedlora deploy`),
with TLS and SuperNode authentication; `flwr run` submits the tiny experiment, over two clients,
for two rounds. Node 0 trains on its own CSV (node config data-path, device), node 1 on its
partition of the built-in data. A third SuperNode, whose key was never registered, must be refused.
(Two nodes, not more: Flower starts a ClientApp process, which imports torch, transformers and
peft, for every message, and that is most of the test's time.)

The end-to-end tests are slow (Flower starts a fresh ClientApp process for every message):
select or skip them with `-m deploy` / `-m "not deploy"`. The other tests are fast: certificates,
keys, the commands `fedlora deploy` runs, and a node's data set from its node config.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import datasets
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key
from flwr.app import Context, Message, MessageType, RecordDict

from clients.app import build_client_app, handle_train
from fedlora import workspace
from fedlora.certificates import CertificateError, write_certificates, write_supernode_key, write_supernode_keys
from fedlora.config import ConfigError, config_from_dict
from fedlora.deploy import (
    DeployError,
    flower_env,
    node_config_string,
    superlink_command,
    supernode_command,
    write_connection,
)
from fedlora.node import NodeExperiment, node_experiment
from fedlora.results import read_history, read_summary
from tests.conftest import TINY, run_cli, tiny_config

APP_DIR = Path(__file__).resolve().parents[1]
NUM_NODES = 2
# The tiny experiment over the deployment's nodes, one client each.
DEPLOYED = {**TINY, "federation": {**TINY["federation"], "num_clients": NUM_NODES, "clients_per_round": NUM_NODES}}
RUN_TIMEOUT = 900.0  # seconds for one `fedlora deploy run` (about 100 on two idle cores; far more on busy ones)
STARTUP_TIMEOUT = 150.0  # Flower processes importing torch on a shared, busy machine


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_overrides(raw: dict, prefix: str = "") -> list[str]:
    """The experiment dict as `section.key=value` overrides (the run config's `overrides`)."""
    items: list[str] = []
    for key, value in raw.items():
        if isinstance(value, dict):
            items += run_overrides(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={json.dumps(value)}")
    return items


@dataclass
class Processes:
    """Every process the test starts, with its log; all of them (and their children) end in stop()."""

    logs: Path
    started: dict[str, subprocess.Popen] = field(default_factory=dict)
    handles: list[IO] = field(default_factory=list)

    def start(self, name: str, command: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        self.handles.append(log)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        self.started[name] = process
        return process

    def log(self, name: str, tail: int = 3000) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-tail:]

    def stop(self, *names: str) -> None:
        """Terminate the named processes (every one, without names) and their descendants, found
        before the parents go."""
        chosen = [self.started[name] for name in names] if names else list(self.started.values())
        tree: list[psutil.Process] = []
        for process in chosen:
            try:
                parent = psutil.Process(process.pid)
                tree += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        for proc in tree:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        for process in chosen:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=5)
        if not names:
            for handle in self.handles:
                handle.close()


def fedlora(*args: str) -> list[str]:
    """A `fedlora` command with this interpreter."""
    return [sys.executable, "-m", "fedlora.cli", *args]


def node_env(base: dict[str, str], home: Path) -> dict[str, str]:
    env = dict(base, FLWR_HOME=str(home))
    home.mkdir(parents=True, exist_ok=True)
    return env


def wait_for(check: Callable[[], bool], timeout: float, what: str, log: Callable[[], str] = str) -> None:
    """Poll `check` until it holds; past `timeout`, fail with `log()` (read then, not before)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{log()}")


def listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Deployment:
    """What the deployment left behind for the assertions."""

    run_dir: Path
    run_exit: int
    run_output: str
    node_ids: list[int]
    online: dict[int, str]
    rogue_exit: int | None
    rogue_log: str
    own_data_log: str
    own_data: Path
    own_data_size: int
    colliding_exit: int
    colliding_output: str


def write_own_data(path: Path) -> int:
    """Client 0's share of the deployed experiment as a CSV with class names as labels."""
    config = config_from_dict(DEPLOYED)
    task = workspace.federated_task(config)
    share = task.partitions[0]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for text, label in zip(share.texts, share.labels):
            writer.writerow([text, task.class_names[label]])
    return len(share.texts)


def write_run_config(path: Path, run_dir: Path, name: str) -> Path:
    """The run config `flwr run` takes: the deployed experiment as overrides of quickstart.toml."""
    name_items = [f"output.name={json.dumps(name)}"]
    path.write_text(
        f"experiment = {json.dumps('simulations/quickstart.toml')}\n"
        f"overrides = {json.dumps(';'.join(run_overrides(DEPLOYED) + name_items))}\n"
        f"run-dir = {json.dumps(str(run_dir))}\n"
    )
    return path


def deployment_env(root: Path) -> dict[str, str]:
    """The environment of every process a deployment test starts (this checkout first on the path)."""
    env = flower_env()
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        OMP_NUM_THREADS="1",  # three nodes' ClientApps share the cores
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(APP_DIR), env.get("PYTHONPATH", "")]),
    )
    return env


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deploy")
    certs = root / "certs"
    write_certificates(certs, ["localhost"], days=1)
    keys = write_supernode_keys(certs / "supernodes", NUM_NODES + 1)  # the last one is never registered
    own_data = root / "client0.csv"
    own_data_size = write_own_data(own_data)

    base_env = deployment_env(root)
    cli_env = node_env(base_env, root / "home-cli")
    fleet_port, control_port = free_port(), free_port()
    fleet = f"127.0.0.1:{fleet_port}"
    processes = Processes(root)
    try:
        superlink = processes.start(
            "superlink",
            fedlora(
                "deploy",
                "superlink",
                "--certs",
                str(certs),
                "--fleet-address",
                fleet,
                "--control-address",
                f"127.0.0.1:{control_port}",
                "--runtime-port",
                str(free_port()),
                "--database",
                ":flwr-in-memory:",
            ),  # fmt: skip
            node_env(base_env, root / "home-superlink"),
            root,
        )
        wait_for(
            lambda: listening(control_port) or superlink.poll() is not None,
            STARTUP_TIMEOUT,
            "the SuperLink",
            lambda: processes.log("superlink"),
        )
        assert superlink.poll() is None, processes.log("superlink")

        subprocess.run(
            fedlora("deploy", "connection", "--address", f"127.0.0.1:{control_port}", "--ca", str(certs / "ca.crt")),
            env=cli_env,
            check=True,
            cwd=root,
        )
        registered = subprocess.run(
            fedlora("deploy", "register", *[str(pair.public) for pair in keys[:NUM_NODES]]),
            env=cli_env,
            cwd=root,
            capture_output=True,
            text=True,
            check=False,
        )
        assert registered.returncode == 0, registered.stdout + registered.stderr

        def supernode(name: str, key: Path, home: str, *where: str) -> subprocess.Popen:
            """Start `fedlora deploy supernode` against this SuperLink with `key`, on a free port."""
            command = fedlora(
                "deploy", "supernode", "--superlink", fleet, "--ca", str(certs / "ca.crt"),
                "--key", str(key), "--port", str(free_port()), *where,
            )  # fmt: skip
            return processes.start(name, command, node_env(base_env, root / home), root)

        def partition(i: int) -> list[str]:
            return ["--partition-id", str(i), "--num-partitions", str(NUM_NODES)]

        for i in range(NUM_NODES):
            where = ["--data-path", str(own_data), "--client-id", "0", "--device", "cpu"] if i == 0 else partition(i)
            supernode(f"supernode-{i}", keys[i].private, f"home-node{i}", *where)
        rogue = supernode(
            "supernode-unregistered", keys[NUM_NODES].private, "home-rogue", *partition(0), "--", "--max-retries", "3"
        )

        def deploy_run(name: str) -> subprocess.CompletedProcess[str]:
            """`fedlora deploy run` of the tiny experiment; it returns when the run has ended."""
            run_config = write_run_config(root / f"{name}.toml", root / "runs", name)
            command = fedlora("deploy", "run", "--run-config", str(run_config), "--app", str(APP_DIR))
            try:
                return subprocess.run(
                    command, env=cli_env, cwd=root, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
                )
            except subprocess.TimeoutExpired as late:  # keep what it printed, for the failure message
                history = root / "runs" / name / "history.jsonl"
                rounds = history.read_text().count("\n") if history.exists() else 0
                printed = b"\n".join(part for part in (late.stdout, late.stderr) if part)  # bytes, whatever `text` says
                output = f"{printed.decode(errors='replace')}\ntimed out after {RUN_TIMEOUT:.0f} s, {rounds} history lines"
                return subprocess.CompletedProcess(command, 124, output, "")

        completed = deploy_run("deployed")  # meanwhile the unregistered node retries, and gives up
        wait_for(
            lambda: rogue.poll() is not None,
            STARTUP_TIMEOUT,
            "the unregistered SuperNode to be turned away",
            lambda: processes.log("supernode-unregistered"),
        )
        nodes = subprocess.run(
            [str(Path(sys.executable).parent / "flwr"), "supernode", "list", "fedlora", "--format", "json"],
            env=cli_env,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        listing = json.loads(nodes.stdout[nodes.stdout.index("{") :])
        # Node 1 comes back claiming node 0's client id: the ServerApp must refuse to start the
        # federation, and the operator's command must say so with its exit status.
        processes.stop("supernode-1")
        supernode("supernode-1-colliding", keys[1].private, "home-node1-colliding", *partition(0))
        colliding = deploy_run("colliding")
        deployment = Deployment(
            run_dir=root / "runs" / "deployed",
            run_exit=completed.returncode,
            run_output=(completed.stdout + completed.stderr)[-6000:],
            node_ids=[int(pair["node-id"]) for pair in _registered(registered.stdout)],
            online={int(node["node-id"]): str(node["status"]) for node in listing.get("nodes", [])},
            rogue_exit=rogue.poll(),
            rogue_log=processes.log("supernode-unregistered"),
            own_data_log=processes.log("supernode-0", tail=200_000),
            own_data=own_data.resolve(),
            own_data_size=own_data_size,
            colliding_exit=colliding.returncode,
            colliding_output=(colliding.stdout + colliding.stderr)[-6000:],
        )
    finally:
        processes.stop()
    yield deployment


def _registered(stdout: str) -> list[dict]:
    """`fedlora deploy register` prints `  NAME.pub: node ID` per key."""
    return [{"node-id": line.rsplit(" ", 1)[1]} for line in stdout.splitlines() if ".pub: node " in line]


@pytest.mark.deploy
@pytest.mark.e2e
def test_a_secured_deployment_runs_two_rounds_and_writes_the_run_directory(deployment: Deployment) -> None:
    assert deployment.run_exit == 0 and ": finished:completed" in deployment.run_output, deployment.run_output
    history = read_history(deployment.run_dir)
    assert [line["round"] for line in history] == [0, 1, 2]
    for line in history[1:]:
        assert sorted(line["clients"]) == list(range(NUM_NODES)) and not line["rejected"]
    summary = read_summary(deployment.run_dir)
    assert summary["status"] == "finished" and summary["num_clients"] == NUM_NODES
    adapter = deployment.run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((deployment.run_dir / "config.json").read_text())["model"]["name"] == "tiny"


@pytest.mark.deploy
@pytest.mark.e2e
def test_a_federation_the_server_refuses_to_start_fails_the_operators_command(deployment: Deployment) -> None:
    output = deployment.colliding_output
    assert deployment.colliding_exit == 1, output
    assert "finished:failed" in output and "is claimed by nodes" in output, output


@pytest.mark.deploy
@pytest.mark.e2e
def test_only_registered_supernodes_join(deployment: Deployment) -> None:
    assert len(deployment.node_ids) == NUM_NODES
    assert set(deployment.online) == set(deployment.node_ids), deployment.online
    assert all(status == "online" for status in deployment.online.values()), deployment.online


@pytest.mark.deploy
@pytest.mark.e2e
def test_the_node_with_a_data_path_trained_on_its_own_file(deployment: Deployment) -> None:
    assert f"node data set {deployment.own_data}: {deployment.own_data_size} examples" in deployment.own_data_log
    assert deployment.rogue_exit not in (None, 0), deployment.rogue_log


# --- fast: certificates, keys, commands, node data -------------------------------------------


def test_the_superlink_certificate_is_signed_by_the_ca_and_names_every_host(tmp_path: Path) -> None:
    files = write_certificates(tmp_path, ["server.lan", "10.1.2.3", "[fd00::5]"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"server.lan", "localhost"}
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"10.1.2.3", "fd00::5", "127.0.0.1", "::1"}
    key = load_pem_private_key(files.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    for private in (files.ca_key, files.server_key):
        assert private.stat().st_mode & 0o077 == 0


def test_supernode_keys_are_nist_ec_pairs_that_flower_accepts(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    pairs = write_supernode_keys(tmp_path, 2)
    assert [pair.private.name for pair in pairs] == ["supernode-0.key", "supernode-1.key"]
    private = load_ssh_private_key(pairs[0].private.read_bytes(), None)
    public = load_ssh_public_key(pairs[0].public.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert try_load_public_key(pairs[0].public)  # what `flwr supernode register` reads
    assert pairs[0].public.read_bytes() != pairs[1].public.read_bytes()


def test_existing_certificates_and_keys_are_kept_unless_forced(tmp_path: Path) -> None:
    write_certificates(tmp_path, ["a.lan"])
    before = (tmp_path / "ca.crt").read_bytes()
    with pytest.raises(CertificateError, match="--force"):
        write_certificates(tmp_path, ["a.lan"])
    assert (tmp_path / "ca.crt").read_bytes() == before
    write_certificates(tmp_path, ["a.lan"], force=True)
    assert (tmp_path / "ca.crt").read_bytes() != before
    write_supernode_key(tmp_path, "jetson")
    with pytest.raises(CertificateError, match="--force"):
        write_supernode_key(tmp_path, "jetson")
    with pytest.raises(CertificateError, match="host name"):
        write_certificates(tmp_path / "other", ["not a host"])


def test_the_superlink_runs_with_tls_and_supernode_auth_and_says_which_file_is_missing(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match="ca.crt.*fedlora deploy certs"):
        superlink_command(tmp_path, "10.1.2.3:9092")
    write_certificates(tmp_path, [])
    command = superlink_command(tmp_path, "10.1.2.3:9999", runtime_port=9991, database=tmp_path / "state.db")
    assert command[:3] == [sys.executable, "-m", "fedlora.superlink"]
    for flag in (
        "--ssl-ca-certfile",
        "--ssl-certfile",
        "--ssl-keyfile",
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
    ):
        assert flag in command
    assert "--insecure" not in command and "--host" not in command and "--port" not in command
    for flag, value in [
        ("--fleet-address", "10.1.2.3:9999"),
        ("--control-address", "127.0.0.1:9093"),  # loopback unless asked otherwise
        ("--runtime-port", "9991"),
        ("--database", str(tmp_path / "state.db")),
    ]:
        assert command[command.index(flag) + 1] == value
    (tmp_path / "server.key").unlink()
    with pytest.raises(DeployError, match="server.key"):
        superlink_command(tmp_path, "10.1.2.3:9092")


def test_a_supernode_command_carries_its_key_ca_and_node_config(tmp_path: Path) -> None:
    write_certificates(tmp_path, [])
    pair = write_supernode_key(tmp_path, "edge")
    data = tmp_path / "mine.csv"
    data.write_text("text,label\nhello,0\n")
    config = node_config_string(data_path=data, device="cuda", client_id=4)
    assert config == f'data-path="{data.resolve()}" client-id=4 device="cuda"'
    command = supernode_command("server.lan:9092", tmp_path / "ca.crt", pair.private, config, port=9500)
    for flag, value in [
        ("--root-certificates", str((tmp_path / "ca.crt").resolve())),
        ("--auth-supernode-private-key", str(pair.private.resolve())),
        ("--node-config", config),
        ("--port", "9500"),
    ]:
        assert command[command.index(flag) + 1] == value
    assert "--insecure" not in command
    assert node_config_string(partition_id=1, num_partitions=3) == "partition-id=1 num-partitions=3"
    with pytest.raises(DeployError, match="client-id"):
        node_config_string(data_path=data)
    with pytest.raises(DeployError, match="csv"):
        node_config_string(data_path=tmp_path / "ca.crt", client_id=0)
    with pytest.raises(DeployError, match="num-partitions"):
        node_config_string(partition_id=1)
    with pytest.raises(DeployError, match="private key"):
        supernode_command("server.lan:9092", tmp_path / "ca.crt", tmp_path / "missing.key", config)


def test_the_flwr_connection_keeps_other_entries(tmp_path: Path) -> None:
    import tomllib

    write_certificates(tmp_path / "certs", [])
    (tmp_path / "config.toml").write_text('[superlink]\ndefault = "local"\n[superlink.local]\naddress = ":local:"\n')
    write_connection("prod", "server.lan:9092", tmp_path / "certs" / "ca.crt", home=tmp_path)
    config = tomllib.loads((tmp_path / "config.toml").read_text())["superlink"]
    assert config["default"] == "prod" and config["local"] == {"address": ":local:"}
    assert config["prod"] == {"address": "server.lan:9092", "root-certificates": str((tmp_path / "certs" / "ca.crt").resolve())}


def own_data_files(tmp_path: Path) -> dict[str, tuple[Path, int]]:
    """The same few examples as CSV (class names), JSONL (class indices), saved HF data set."""
    config = tiny_config()
    task = workspace.federated_task(config)
    texts, labels = task.partitions[1].texts[:17], task.partitions[1].labels[:17]
    csv_path = tmp_path / "own.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows([text, task.class_names[label]] for text, label in zip(texts, labels))
    jsonl_path = tmp_path / "own.jsonl"
    jsonl_path.write_text("\n".join(json.dumps({"text": text, "label": label}) for text, label in zip(texts, labels)))
    saved = tmp_path / "own-hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts, "label": labels})}).save_to_disk(str(saved))
    return {"csv": (csv_path, len(texts)), "jsonl": (jsonl_path, len(texts)), "hf": (saved, len(texts))}


@pytest.mark.usefixtures("flower_task")
def test_a_node_with_a_data_path_answers_for_its_own_examples(tmp_path: Path) -> None:
    config = tiny_config()
    app = build_client_app(config)
    expected = None
    for kind, (path, size) in own_data_files(tmp_path).items():
        context = Context(
            run_id=1,
            node_id=1,
            node_config={"data-path": str(path), "client-id": 2, "device": "cpu"},
            state=RecordDict(),
            run_config={},
        )
        reply = app(Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY), context)
        assert reply.content["metrics"]["num-examples"] == size, kind
        assert reply.content["info"]["client-id"] == 2
        examples = workspace.client_examples(node_experiment(config, context.node_config), 2)
        if expected is None:
            expected = examples.labels.tolist()
        assert examples.labels.tolist() == expected, f"{kind}: labels differ from the CSV's class names"
    # Without a data-path the node answers for its partition, as in simulation.
    context = Context(
        run_id=1, node_id=1, node_config={"partition-id": 2, "num-partitions": 3}, state=RecordDict(), run_config={}
    )
    reply = app(Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY), context)
    assert reply.content["metrics"]["num-examples"] == len(workspace.federated_task(config).partitions[2].labels)


def first_train_message(config) -> Message:
    """Round 1's train message for the tiny experiment, from its initial state."""
    from fedlora.server import train_config

    num_labels = workspace.federated_task(config).num_labels
    record = train_config(config, num_labels)
    record.update({"server-round": 1, "train-factors": "AB", "train-head": config.model.train_head})
    state = workspace.initial_state(config, num_labels)
    return Message(
        RecordDict({"arrays": state.to_array_record(), "config": record}), dst_node_id=1, message_type=MessageType.TRAIN
    )


@pytest.mark.usefixtures("flower_task")
def test_a_node_trains_on_its_own_data_and_device(tmp_path: Path) -> None:
    config = tiny_config()
    path, size = own_data_files(tmp_path)["csv"]
    node_config = {"data-path": str(path), "client-id": 1, "device": "cpu"}
    node = node_experiment(config, node_config)
    assert isinstance(node, NodeExperiment) and node.shared() == config
    assert next(workspace.lora_model(node, 8).parameters()).device.type == "cpu"
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    reply = handle_train(first_train_message(config), context, node)
    assert (
        reply.content["metrics"]["num-examples"] == size
        and reply.content["metrics"]["train-steps"] == config.federation.local_steps
    )


@pytest.mark.parametrize(
    "node_config, message",
    [
        ({"partition-id": 0, "num-partitions": 5}, "num-partitions=5"),
        ({"client-id": 3}, "0..2"),
        ({"data-path": "/nowhere/data.csv", "client-id": 0}, "does not exist"),
        ({"data-path": "{tmp}/own.csv"}, "client-id"),
        ({"partition-id": 0, "device": "tpu9"}, "not a torch device"),
    ],
)
def test_a_node_config_that_cannot_work_is_refused_with_the_key_named(tmp_path: Path, node_config: dict, message: str) -> None:
    (tmp_path / "own.csv").write_text("text,label\nhi,0\n")
    node_config = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in node_config.items()}
    with pytest.raises(ConfigError, match=message):
        node_experiment(tiny_config(), node_config)


def test_labels_that_are_not_classes_of_the_task_are_refused(tmp_path: Path) -> None:
    (tmp_path / "own.csv").write_text("text,label\nhello,weather\n")
    node = node_experiment(tiny_config(), {"data-path": str(tmp_path / "own.csv"), "client-id": 0})
    with pytest.raises(ConfigError, match="'weather'.*not a class"):
        workspace.client_examples(node, 0)


def test_without_cuda_a_cuda_node_is_refused_before_training() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="no CUDA device"):
        node_experiment(tiny_config(), {"partition-id": 0, "device": "cuda"})


def test_fedlora_deploy_prints_the_flower_command_and_a_missing_file_in_one_line(tmp_path: Path) -> None:
    superlink = ["deploy", "superlink", "--certs", str(tmp_path), "--fleet-address", "10.1.2.3:9092"]
    code, output = run_cli(*superlink, "--dry-run")
    assert code == 2 and "Traceback" not in output and "ca.crt" in output and "fedlora deploy certs" in output
    code, output = run_cli("deploy", "certs", "--out", str(tmp_path), "--supernodes", "1")
    assert code == 0 and (tmp_path / "supernodes" / "supernode-0.key").is_file()
    code, output = run_cli(*superlink, "--database", ":flwr-in-memory:", "--dry-run")
    assert code == 0 and "fedlora.superlink" in output and "--enable-supernode-auth" in output
    key = str(tmp_path / "supernodes" / "supernode-0.key")
    supernode = ["deploy", "supernode", "--superlink", "server.lan:9092", "--ca", str(tmp_path / "ca.crt"), "--key", key]
    code, output = run_cli(*supernode, "--partition-id", "0", "--num-partitions", "3", "--dry-run")
    assert code == 0 and "flower-supernode" in output and "partition-id=0 num-partitions=3" in output
    code, output = run_cli(*supernode, "--data-path", str(tmp_path / "none.csv"), "--client-id", "0")
    assert code == 2 and "Traceback" not in output and "--data-path" in output
