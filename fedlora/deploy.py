"""`fedlora deploy`: the files and processes of a secured deployment on Flower's deployment engine.

A deployment is one SuperLink (the server; it runs our ServerApp for each `flwr run`) and one
SuperNode per device (it runs our ClientApp on the device's own data). Everything goes over TLS,
and the SuperLink only accepts SuperNodes whose public key was registered with it.

    certs       a CA, the SuperLink's certificate for its host names / IPs, SuperNode key pairs
                (fedlora/certificates.py)
    node-key    one SuperNode key pair (run it on the device: the private key never travels)
    superlink   start the SuperLink with TLS and SuperNode authentication: the Fleet API on the
                address the operator names, the Control API on loopback unless asked otherwise,
                the Runtime API on loopback (fedlora/superlink.py)
    connection  write the SuperLink connection `flwr run` / `flwr supernode` use ($FLWR_HOME)
    register    register SuperNode public keys with the SuperLink (`flwr supernode register`)
    supernode   start `flower-supernode` with TLS, its private key and its node config
    run         `flwr run`, then follow the run's log; the exit status says whether it completed
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from fedlora.certificates import (
    CA_CERT,
    SERVER_CERT,
    SERVER_KEY,
    CertificateError,
    PendingFile,
    check_key_pair,
    read_certificates,
    read_private_key,
    split_hosts,
    write_deployment,
    write_files,
    write_supernode_key,
)
from fedlora.superlink import (
    DEFAULT_CONTROL_ADDRESS,
    FLEET_PORT,
    RUNTIME_PORT,
    SuperLinkError,
    database_path,
    flower_arguments,
    is_loopback,
    plan_listeners,
    split_address,
)

deploy = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Deploy on Flower's deployment engine: certificates, SuperLink, SuperNodes (TLS + SuperNode auth).",
)
console = Console(soft_wrap=True)

APP_DIR = Path(__file__).resolve().parent.parent  # the Flower app `flwr run` sends (this repository)
DEFAULT_CERTS = Path("deploy/certs")
DEFAULT_DATABASE = Path("deploy/superlink.db")
DEFAULT_CONNECTION = "fedlora"
SUPERNODE_PORT = 9094  # a SuperNode's local Runtime API (its ClientApp processes); one per node
FLWR_IN_MEMORY = ":flwr-in-memory:"
RUN_COMPLETED = "finished:completed"


class DeployError(RuntimeError):
    """A deployment step cannot go on; the message says what to do."""


# --- the Flower processes ----------------------------------------------------------------------


def flower_executable(name: str) -> str:
    """A Flower command from this Python environment (its bin folder), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"{name} not found: install fedlora's dependencies (flwr) in this environment")
    return found


def flower_process(name: str) -> list[str]:
    """A Flower command run so that it ends when its main thread does (fedlora/flower_process.py)."""
    return [sys.executable, "-m", "fedlora.flower_process", name]


def flower_env() -> dict[str, str]:
    """The environment for Flower's processes: this environment's bin folder first on PATH,
    since the SuperLink and SuperNode start `flower-superexec` and the app processes by name."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _need_file(path: Path, what: str, fix: str) -> Path:
    if not path.is_file():
        raise DeployError(f"{what} not found: {path}; {fix}")
    return path.resolve()


def superlink_command(
    certs: Path,
    fleet_address: str,
    control_address: str = DEFAULT_CONTROL_ADDRESS,
    runtime_port: int = RUNTIME_PORT,
    database: str | Path = DEFAULT_DATABASE,
    extra: list[str] | None = None,
) -> list[str]:
    """The SuperLink (`python -m fedlora.superlink`, Flower's SuperLink with one address per API)
    with TLS, SuperNode authentication and no runtime dependency installs. Checks the files and
    the addresses; creates nothing (the SuperLink creates its state file, 0600, when it starts)."""
    fix = f"create them with `fedlora deploy certs --out {certs} --host <this server's address>`"
    ca = _need_file(certs / CA_CERT, "CA certificate", fix)
    cert = _need_file(certs / SERVER_CERT, "SuperLink certificate", fix)
    key = _need_file(certs / SERVER_KEY, "SuperLink private key", fix)
    try:
        read_certificates(ca, "--certs", fix)
        check_key_pair(cert, key, "--certs", fix)
        plan_listeners(fleet_address, control_address, runtime_port)
        state = database_path(str(database))
        flower_args = flower_arguments(list(extra or []))
    except (CertificateError, SuperLinkError) as err:
        raise DeployError(str(err)) from None
    return [
        sys.executable,
        "-m",
        "fedlora.superlink",
        "--fleet-address",
        fleet_address,
        "--control-address",
        control_address,
        "--runtime-port",
        str(runtime_port),
        "--database",
        str(state.resolve()) if state is not None else str(database),
        "--ssl-ca-certfile",
        str(ca),
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
        "--enable-supernode-auth",
        # The app's dependencies are installed on the server already; don't let `uv sync` try.
        "--disable-runtime-dependency-installation",
        *flower_args,
    ]


def toml_value(value: str | float | bool) -> str:
    """A node-config value as Flower parses it (TOML): strings quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def node_config_string(
    data_path: Path | None = None,
    device: str | None = None,
    client_id: int | None = None,
    partition_id: int | None = None,
    num_partitions: int | None = None,
    extra: str | None = None,
) -> str:
    """The `--node-config` of a SuperNode: where its data is, its device, which client it is."""
    if data_path is not None and client_id is None and partition_id is None:
        raise DeployError("a SuperNode with --data-path needs --client-id (unique in the federation, 0..num_clients-1)")
    if data_path is None and partition_id is None and client_id is None:
        raise DeployError(
            "give --data-path and --client-id (the device's own data) or --partition-id and --num-partitions (its share of the experiment's data)"
        )
    if partition_id is not None and client_id is not None:
        raise DeployError("give either --client-id or --partition-id, not both")
    if (partition_id is None) != (num_partitions is None):
        raise DeployError(
            "--partition-id and --num-partitions go together (num-partitions: the experiment's federation.num_clients)"
        )
    items: list[tuple[str, str | int]] = []
    if data_path is not None:
        from fedlora.data.files import LOCAL_FORMATS  # here, not on top: it brings the config (and torch) in

        if not (data_path.is_dir() or (data_path.is_file() and data_path.suffix.lower() in LOCAL_FORMATS)):
            raise DeployError(
                f"--data-path {data_path}: not an existing {' / '.join(LOCAL_FORMATS)} file nor a saved Hugging Face data set folder"
            )
        items.append(("data-path", str(data_path.resolve())))
    if client_id is not None:
        items.append(("client-id", client_id))
    if partition_id is not None and num_partitions is not None:
        items += [("partition-id", partition_id), ("num-partitions", num_partitions)]
    if device:
        items.append(("device", device))
    text = " ".join(f"{key}={toml_value(value)}" for key, value in items)
    return f"{text} {extra.strip()}" if extra and extra.strip() else text


def supernode_command(
    superlink: str,
    ca_cert: Path,
    private_key: Path,
    node_config: str,
    port: int = SUPERNODE_PORT,
    extra: list[str] | None = None,
) -> list[str]:
    """`flower-supernode` that verifies the SuperLink with the CA and authenticates with its key."""
    if ":" not in superlink:
        raise DeployError(
            f"--superlink {superlink!r}: expected HOST:PORT of the SuperLink's Fleet API, e.g. server.lan:{FLEET_PORT}"
        )
    ca = _need_file(ca_cert, "CA certificate", "copy the deployment's ca.crt to this device")
    key = _need_file(private_key, "SuperNode private key", "create one with `fedlora deploy node-key NAME`")
    try:
        read_certificates(ca, "--ca", "give the deployment's ca.crt (written by `fedlora deploy certs`)")
        read_private_key(key, "--key", "give a key from `fedlora deploy node-key NAME` (its .key file)", openssh=True)
    except CertificateError as err:
        raise DeployError(str(err)) from None
    return [
        *flower_process("flower-supernode"),
        "--superlink",
        superlink,
        "--root-certificates",
        str(ca),
        "--auth-supernode-private-key",
        str(key),
        "--node-config",
        node_config,
        "--port",
        str(port),
        *(extra or []),
    ]


# --- the CLI connection to the SuperLink ---------------------------------------------------------


def flwr_home() -> Path:
    """Where the Flower CLI keeps its config: $FLWR_HOME, else ~/.flwr."""
    return Path(os.environ["FLWR_HOME"]) if os.environ.get("FLWR_HOME") else Path.home() / ".flwr"


def write_connection(name: str, address: str, ca_cert: Path, make_default: bool = True, home: Path | None = None) -> Path:
    """Add (or replace) `[superlink.NAME]` in the Flower CLI config, keeping the other entries."""
    import tomli_w

    if ":" not in address:
        raise DeployError(
            f"--address {address!r}: expected HOST:PORT of the SuperLink's Control API, e.g. {DEFAULT_CONTROL_ADDRESS}"
        )
    ca = _need_file(ca_cert, "CA certificate", "give the deployment's ca.crt")
    path = (home or flwr_home()) / "config.toml"
    fix = "set FLWR_HOME to a folder you can write to (the Flower CLI keeps its config there)"
    try:
        config = tomllib.loads(path.read_text()) if path.exists() else {}
    except tomllib.TOMLDecodeError as err:
        raise DeployError(f"{path} is not valid TOML ({err}); fix or remove it") from None
    except OSError as err:
        raise DeployError(f"cannot read {path}: {err.strerror or err}; {fix}") from None
    superlinks = config.setdefault("superlink", {})
    superlinks.setdefault("local", {"address": ":local:"})  # Flower's own default: local simulation
    superlinks[name] = {"address": address, "root-certificates": str(ca)}
    if make_default or "default" not in superlinks:
        superlinks["default"] = name
    try:
        write_files([PendingFile(path, tomli_w.dumps(config).encode())], force=True, fix=fix)
    except CertificateError as err:
        raise DeployError(str(err)) from None
    return path


# --- CLI ---------------------------------------------------------------------------------------


def _fail(err: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def _show(command: list[str]) -> None:
    console.print(f"$ {escape(shlex.join(command))}", highlight=False, soft_wrap=True)


def _launch(command: list[str], dry_run: bool) -> None:
    """Print the command, then become it (signals and exit status are the Flower process's own)."""
    _show(command)
    if dry_run:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    env = flower_env()
    os.execve(command[0], command, env)


@deploy.command()
def certs(
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="A name or IP address the SuperNodes use to reach the SuperLink (repeatable); loopback is always added.",
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the files.")] = DEFAULT_CERTS,
    supernodes: Annotated[
        int, typer.Option("--supernodes", "-n", min=0, help="SuperNode key pairs to create (supernodes/supernode-<i>.key/.pub).")
    ] = 0,
    days: Annotated[int, typer.Option("--days", help="Validity of the certificates.")] = 365,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
) -> None:
    """Create a CA, the SuperLink's TLS certificate for its host names / IPs, and SuperNode key pairs."""
    try:
        files, pairs = write_deployment(out, host or [], days, supernodes, force)
    except CertificateError as err:
        raise _fail(err) from None
    names, ips = split_hosts(host or [])
    console.print(f"CA:        {files.ca_cert}  (its key {files.ca_key} stays on the server)", highlight=False)
    console.print(f"SuperLink: {files.server_cert}, {files.server_key}  valid for {', '.join(names + ips)}", highlight=False)
    for pair in pairs:
        console.print(f"SuperNode: {pair.private}  (public: {pair.public})", highlight=False)
    console.print("Copy ca.crt and one private key to each device; register the .pub files with `fedlora deploy register`.")


@deploy.command("node-key")
def node_key(
    name: Annotated[str, typer.Argument(help="Key name, e.g. jetson-1: writes NAME.key and NAME.pub.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the key pair.")] = Path("deploy/keys"),
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
) -> None:
    """Create one SuperNode key pair (run it on the device; send only the .pub to the server)."""
    try:
        pair = write_supernode_key(out, name, force)
    except CertificateError as err:
        raise _fail(err) from None
    console.print(f"private key: {pair.private}\npublic key:  {pair.public}", highlight=False)


@deploy.command()
def superlink(
    fleet_address: Annotated[
        str | None,
        typer.Option(
            "--fleet-address",
            help=f"HOST:PORT the SuperNodes connect to: this server's IP on the devices' network (or 0.0.0.0 for every "
            f"interface), e.g. 192.168.1.10:{FLEET_PORT}. Required: nothing is served beyond loopback unless named here.",
        ),
    ] = None,
    control_address: Annotated[
        str,
        typer.Option(
            "--control-address",
            help="HOST:PORT of the Control API, where `flwr` registers SuperNodes and starts runs. Loopback unless "
            "you name another address; it has no user authentication: whoever reaches it can run code on this server.",
        ),
    ] = DEFAULT_CONTROL_ADDRESS,
    runtime_port: Annotated[
        int, typer.Option("--runtime-port", help="Loopback port of the Runtime API (the SuperLink's ServerApp processes).")
    ] = RUNTIME_PORT,
    certs_dir: Annotated[Path, typer.Option("--certs", help="Folder with ca.crt, server.crt, server.key.")] = DEFAULT_CERTS,
    database: Annotated[
        str,
        typer.Option(
            "--database", help=f"State file (registered SuperNodes, runs, task tokens; kept 0600); {FLWR_IN_MEMORY} keeps none."
        ),
    ] = str(DEFAULT_DATABASE),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the command without running it; creates nothing.")] = False,
    extra: Annotated[list[str] | None, typer.Argument(help="More flower-superlink arguments (after --).")] = None,
    old_host: Annotated[str | None, typer.Option("--host", hidden=True)] = None,
    old_port: Annotated[int | None, typer.Option("--port", hidden=True)] = None,
) -> None:
    """Start the SuperLink with TLS and SuperNode authentication (prints the command it runs)."""
    try:
        if old_host is not None or old_port is not None:
            raise DeployError(
                "--host and --port are gone: the SuperLink serves each API on its own address; give --fleet-address "
                f"HOST:PORT (the SuperNodes'), and --control-address only to serve `flwr` beyond {DEFAULT_CONTROL_ADDRESS}"
            )
        if fleet_address is None:
            raise DeployError(
                f"--fleet-address HOST:PORT is required: the address the SuperNodes reach, e.g. 192.168.1.10:{FLEET_PORT} "
                f"(an interface of this server; 0.0.0.0 for all); `flwr` uses --control-address, {DEFAULT_CONTROL_ADDRESS}"
            )
        command = superlink_command(certs_dir, fleet_address, control_address, runtime_port, database, extra)
    except DeployError as err:
        raise _fail(err) from None
    if not is_loopback(split_address(control_address, "--control-address")[0]):
        console.print(
            f"[yellow]warning:[/yellow] the Control API on {escape(control_address)}: whoever reaches it can register a "
            "SuperNode and run code on this server (flwr 1.41 has no user authentication); allow only the operators in",
            highlight=False,
        )
    _launch(command, dry_run)


@deploy.command()
def connection(
    address: Annotated[
        str,
        typer.Option(
            "--address",
            help="HOST:PORT of the SuperLink's Control API, a name or IP its certificate names (run on the server: loopback).",
        ),
    ] = DEFAULT_CONTROL_ADDRESS,
    ca_cert: Annotated[Path, typer.Option("--ca", help="The deployment's CA certificate.")] = DEFAULT_CERTS / CA_CERT,
    name: Annotated[str, typer.Option("--name", help="Connection name for `flwr run . NAME`.")] = DEFAULT_CONNECTION,
    default: Annotated[bool, typer.Option("--default/--no-default", help="Make it the default connection.")] = True,
) -> None:
    """Write the SuperLink connection `flwr run` and `flwr supernode` use, in $FLWR_HOME/config.toml."""
    try:
        path = write_connection(name, address, ca_cert, default)
    except DeployError as err:
        raise _fail(err) from None
    console.print(escape(f"[superlink.{name}] -> {address} (TLS, CA {ca_cert}) in {path}"), highlight=False)


@deploy.command()
def register(
    public_keys: Annotated[list[Path], typer.Argument(metavar="PUBLIC_KEY...", help="SuperNode public keys (.pub).")],
    name: Annotated[
        str, typer.Option("--connection", help="SuperLink connection (see `fedlora deploy connection`).")
    ] = DEFAULT_CONNECTION,
) -> None:
    """Register SuperNode public keys with the SuperLink; only registered SuperNodes may connect."""
    missing = [str(key) for key in public_keys if not key.is_file()]
    try:
        if missing:
            raise DeployError(f"public key(s) not found: {', '.join(missing)}; nothing registered")
        flower_executable("flwr")
    except DeployError as err:
        raise _fail(err) from None
    failed = 0
    for key in public_keys:
        done = _flwr("supernode", "register", str(key), name, "--format", "json", show=True)
        node_id = _registered_node_id(done.stdout)
        if done.returncode == 0 and node_id is not None:
            console.print(f"  {key.name}: node {node_id}", highlight=False)
        else:
            failed += 1
            console.print(
                f"  [red]{escape(key.name)}: not registered[/red] {escape((done.stderr or done.stdout).strip())}", highlight=False
            )
    if failed:
        raise typer.Exit(1)


def _flwr_reply(stdout: str) -> dict[str, Any] | None:
    """The JSON object a `flwr ... --format json` command prints (after any log lines)."""
    try:
        reply = json.loads(stdout[stdout.index("{") :])
    except ValueError:  # no "{", or not JSON
        return None
    return reply if isinstance(reply, dict) else None


def _registered_node_id(stdout: str) -> int | None:
    """The node id in `flwr supernode register --format json` output."""
    reply = _flwr_reply(stdout) or {}
    return int(reply["node-id"]) if reply.get("success") and "node-id" in reply else None


def _flwr(*args: str, show: bool = False) -> subprocess.CompletedProcess[str]:
    """A `flwr` command of this environment (printed first with `show`), its output captured."""
    command = [flower_executable("flwr"), *args]
    if show:
        _show(command)
    return subprocess.run(command, capture_output=True, text=True, env=flower_env(), check=False)


def run_status(run_id: int, connection_name: str) -> tuple[str, str]:
    """A run's status (e.g. finished:completed, finished:failed, running) and Flower's details on it."""
    listed = _flwr("list", connection_name, "--run-id", str(run_id), "--format", "json")
    runs = (_flwr_reply(listed.stdout) or {}).get("runs") or [{}]
    details = runs[0].get("status-details") or (listed.stderr or listed.stdout).strip()[-500:]
    return str(runs[0].get("status", "unknown")), str(details)


@deploy.command("run")
def run_app(
    run_config: Annotated[
        list[str] | None,
        typer.Option(
            "--run-config",
            help='As for `flwr run`: "key=value ..." (TOML values) or a TOML file, e.g. "experiment=\'simulations/quickstart.toml\'".',
        ),
    ] = None,
    name: Annotated[
        str, typer.Option("--connection", help="SuperLink connection (see `fedlora deploy connection`).")
    ] = DEFAULT_CONNECTION,
    app: Annotated[Path, typer.Option("--app", help="The Flower app to send: this repository.")] = APP_DIR,
) -> None:
    """Start a run (`flwr run`), print its log until it ends (`flwr log --stream`), and exit 0 only
    if it completed; 1 if the ServerApp failed, the run was stopped, or it could not start."""
    try:
        flower_executable("flwr")
    except DeployError as err:
        raise _fail(err) from None
    config_args = [arg for item in run_config or [] for arg in ("--run-config", item)]
    submitted = _flwr("run", str(app), name, *config_args, "--format", "json", show=True)
    run_id = (_flwr_reply(submitted.stdout) or {}).get("run-id")
    if submitted.returncode != 0 or run_id is None:
        console.print(f"[red]not started:[/red] {escape((submitted.stderr or submitted.stdout).strip())}", highlight=False)
        raise typer.Exit(1)
    console.print(f"run {run_id} started; its log follows (Ctrl-C stops following, not the run)", highlight=False)
    sys.stdout.flush()
    try:  # the stream ends when the run has finished, whichever way
        follow = [flower_executable("flwr"), "log", str(run_id), name, "--stream"]
        _show(follow)
        subprocess.run(follow, env=flower_env(), check=False)
    except KeyboardInterrupt:
        pass
    status, details = run_status(int(run_id), name)
    if status == RUN_COMPLETED:
        console.print(f"run {run_id}: {status}", highlight=False)
        return
    console.print(f"[red]run {run_id}: {escape(status)}[/red] {escape(details)}", highlight=False)
    if not status.startswith("finished"):
        console.print(
            f"follow it with `flwr log {run_id} {name} --stream`, stop it with `flwr stop {run_id} {name}`", highlight=False
        )
    raise typer.Exit(1)


@deploy.command()
def supernode(
    superlink_address: Annotated[
        str,
        typer.Option(
            "--superlink", help="HOST:PORT of the SuperLink's Fleet API (its --fleet-address, as the device reaches it)."
        ),
    ],
    private_key: Annotated[Path, typer.Option("--key", help="This SuperNode's private key (registered .pub).")],
    ca_cert: Annotated[Path, typer.Option("--ca", help="The deployment's CA certificate.")] = DEFAULT_CERTS / CA_CERT,
    data_path: Annotated[
        Path | None,
        typer.Option(
            "--data-path", help="This device's data set: .csv, .jsonl, .json, .parquet or a saved Hugging Face data set folder."
        ),
    ] = None,
    client_id: Annotated[
        int | None,
        typer.Option("--client-id", help="Which client this node is (unique, 0..num_clients-1); needed with --data-path."),
    ] = None,
    partition_id: Annotated[
        int | None, typer.Option("--partition-id", help="Without --data-path: this node's share of the experiment's data.")
    ] = None,
    num_partitions: Annotated[
        int | None, typer.Option("--num-partitions", help="With --partition-id: the experiment's federation.num_clients.")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="Torch device for training: cpu, cuda, cuda:1, auto.")] = None,
    port: Annotated[
        int, typer.Option("--port", help="Local Runtime API port; distinct for each SuperNode on one machine.")
    ] = SUPERNODE_PORT,
    node_config: Annotated[
        str | None, typer.Option("--node-config", help="More node config, 'key=value ...' (TOML values).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the command without running it.")] = False,
    extra: Annotated[list[str] | None, typer.Argument(help="More flower-supernode arguments (after --).")] = None,
) -> None:
    """Start a SuperNode: TLS to the SuperLink, authenticated by its key, training on its own data."""
    from fedlora.config import ConfigError
    from fedlora.node import resolve_device

    try:
        config = node_config_string(data_path, device, client_id, partition_id, num_partitions, node_config)
        command = supernode_command(superlink_address, ca_cert, private_key, config, port, extra)
        resolve_device(device)  # refuse device="cuda" here, not at the first round, when torch has none
    except (DeployError, ConfigError) as err:
        raise _fail(err) from None
    _launch(command, dry_run)
