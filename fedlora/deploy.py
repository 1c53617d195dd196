"""`fedlora deploy`: the files and processes of a secured deployment on Flower's deployment engine.

A deployment is one SuperLink (the server; it runs our ServerApp for each `flwr run`) and one
SuperNode per device (it runs our ClientApp on the device's own data). Everything goes over TLS,
and the SuperLink only accepts SuperNodes whose public key was registered with it.

    certs       a CA, the SuperLink's certificate for its host names / IPs, SuperNode key pairs
    node-key    one SuperNode key pair (run it on the device: the private key never travels)
    superlink   start `flower-superlink` with TLS and SuperNode authentication on
    connection  write the SuperLink connection `flwr run` / `flwr supernode` use ($FLWR_HOME)
    register    register SuperNode public keys with the SuperLink (`flwr supernode register`)
    supernode   start `flower-supernode` with TLS, its private key and its node config

Files written by `certs` (`--out`, default deploy/certs):

    ca.crt, ca.key              the certificate authority (keep ca.key off the devices)
    server.crt, server.key      the SuperLink's TLS certificate and key
    supernodes/NAME.key, .pub   SuperNode key pairs (OpenSSH format, NIST P-384)
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

deploy = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Deploy on Flower's deployment engine: certificates, SuperLink, SuperNodes (TLS + SuperNode auth).",
)
console = Console(soft_wrap=True)

DEFAULT_CERTS = Path("deploy/certs")
DEFAULT_DATABASE = Path("deploy/superlink.db")
DEFAULT_CONNECTION = "fedlora"
SUPERLINK_PORT = 9092  # one HTTPS port serves the Fleet, Control and Runtime APIs (flwr 1.41)
SUPERNODE_PORT = 9094  # a SuperNode's local Runtime API (its ClientApp processes); one per node
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")  # the SuperLink's own processes connect here
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.crt", "server.key"
SUPERNODE_DIR = "supernodes"
FLWR_IN_MEMORY = ":flwr-in-memory:"


class DeployError(RuntimeError):
    """A deployment step cannot go on; the message says what to do."""


# --- certificates and keys -------------------------------------------------------------------


@dataclass(frozen=True)
class CertificateFiles:
    """Where `write_certificates` put the CA and the SuperLink's certificate."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class KeyPair:
    """A SuperNode's authentication key pair on disk."""

    private: Path
    public: Path


def split_hosts(hosts: list[str]) -> tuple[list[str], list[str]]:
    """DNS names and IP addresses (in that order) for the certificate, loopback always included."""
    names: list[str] = []
    ips: list[str] = []
    for host in [*hosts, *LOOPBACK_NAMES]:
        host = host.strip().strip("[]")
        if not host:
            continue
        try:
            ip = str(ipaddress.ip_address(host))
        except ValueError:
            if not all(part and len(part) < 64 for part in host.split(".")) or " " in host:
                raise DeployError(f"--host {host!r}: not a host name nor an IP address") from None
            if host not in names:
                names.append(host)
        else:
            if ip not in ips:
                ips.append(ip)
    return names, ips


def _refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise DeployError(f"{', '.join(existing)} already exist(s); pass --force to replace, or choose another --out")


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def write_certificates(out: Path, hosts: list[str], days: int = 365, force: bool = False) -> CertificateFiles:
    """A self-signed CA and a SuperLink certificate it signs, valid for `hosts` and loopback."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    files = CertificateFiles(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY)
    _refuse_overwrite([files.ca_cert, files.ca_key, files.server_cert, files.server_key], force)
    if days < 1:
        raise DeployError(f"--days {days}: a certificate must be valid for at least one day")
    names, ips = split_hosts(hosts)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                False, False, False, False, False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    common_name = (names or ips)[0]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                True, False, False, False, True, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False
            ),
            critical=True,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    pem, pkcs8, plain = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    out.mkdir(parents=True, exist_ok=True)
    _write_private(files.ca_key, ca_key.private_bytes(pem, pkcs8, plain))
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    _write_private(files.server_key, server_key.private_bytes(pem, pkcs8, plain))
    files.server_cert.write_bytes(server_cert.public_bytes(pem))
    return files


def write_supernode_key(out: Path, name: str, force: bool = False) -> KeyPair:
    """One SuperNode key pair: `NAME.key` (private, OpenSSH) and `NAME.pub` (what is registered)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not name or "/" in name or name.startswith("."):
        raise DeployError(f"key name {name!r}: use a plain file name such as supernode-0")
    pair = KeyPair(out / f"{name}.key", out / f"{name}.pub")
    _refuse_overwrite([pair.private, pair.public], force)
    key = ec.generate_private_key(ec.SECP384R1())  # Flower accepts NIST EC curves for SuperNodes
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_private(pair.private, private)
    pair.public.write_bytes(public + f" {name}\n".encode())
    return pair


def write_supernode_keys(out: Path, count: int, prefix: str = "supernode", force: bool = False) -> list[KeyPair]:
    """`count` key pairs named PREFIX-0, PREFIX-1, ..."""
    return [write_supernode_key(out, f"{prefix}-{i}", force) for i in range(count)]


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
    host: str = "0.0.0.0",
    port: int = SUPERLINK_PORT,
    database: str | Path = DEFAULT_DATABASE,
    extra: list[str] | None = None,
) -> list[str]:
    """`flower-superlink` with TLS, SuperNode authentication and no runtime dependency installs."""
    fix = f"create them with `fedlora deploy certs --out {certs} --host <this server's address>`"
    ca = _need_file(certs / CA_CERT, "CA certificate", fix)
    cert = _need_file(certs / SERVER_CERT, "SuperLink certificate", fix)
    key = _need_file(certs / SERVER_KEY, "SuperLink private key", fix)
    if str(database) != FLWR_IN_MEMORY:
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        database = Path(database).resolve()
    return [
        flower_executable("flower-superlink"),
        "--ssl-ca-certfile",
        str(ca),
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
        "--enable-supernode-auth",
        # The app's dependencies are installed on the server already; don't let `uv sync` try.
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(database),
        *(extra or []),
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
        if not (data_path.is_dir() or (data_path.is_file() and data_path.suffix in (".csv", ".jsonl"))):
            raise DeployError(
                f"--data-path {data_path}: not an existing .csv / .jsonl file nor a saved Hugging Face data set folder"
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
        raise DeployError(f"--superlink {superlink!r}: expected HOST:PORT, e.g. server.lan:{SUPERLINK_PORT}")
    ca = _need_file(ca_cert, "CA certificate", "copy the deployment's ca.crt to this device")
    key = _need_file(private_key, "SuperNode private key", "create one with `fedlora deploy node-key NAME`")
    return [
        flower_executable("flower-supernode"),
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
        raise DeployError(f"--address {address!r}: expected HOST:PORT of the SuperLink, e.g. server.lan:{SUPERLINK_PORT}")
    ca = _need_file(ca_cert, "CA certificate", "give the deployment's ca.crt")
    path = (home or flwr_home()) / "config.toml"
    try:
        config = tomllib.loads(path.read_text()) if path.exists() else {}
    except tomllib.TOMLDecodeError as err:
        raise DeployError(f"{path} is not valid TOML ({err}); fix or remove it") from None
    superlinks = config.setdefault("superlink", {})
    superlinks.setdefault("local", {"address": ":local:"})  # Flower's own default: local simulation
    superlinks[name] = {"address": address, "root-certificates": str(ca)}
    if make_default or "default" not in superlinks:
        superlinks["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
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
        keys = out / SUPERNODE_DIR
        every = [out / n for n in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)]
        every += [keys / f"supernode-{i}{suffix}" for i in range(supernodes) for suffix in (".key", ".pub")]
        _refuse_overwrite(every, force)  # before writing anything
        files = write_certificates(out, host or [], days, force)
        pairs = write_supernode_keys(keys, supernodes, force=force)
    except DeployError as err:
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
    except DeployError as err:
        raise _fail(err) from None
    console.print(f"private key: {pair.private}\npublic key:  {pair.public}", highlight=False)


@deploy.command()
def superlink(
    certs_dir: Annotated[Path, typer.Option("--certs", help="Folder with ca.crt, server.crt, server.key.")] = DEFAULT_CERTS,
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "0.0.0.0",
    port: Annotated[
        int, typer.Option("--port", help="The one HTTPS port for SuperNodes, `flwr` and the ServerApp.")
    ] = SUPERLINK_PORT,
    database: Annotated[
        str, typer.Option("--database", help=f"State file (registered SuperNodes, runs); {FLWR_IN_MEMORY} keeps none.")
    ] = str(DEFAULT_DATABASE),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the command without running it.")] = False,
    extra: Annotated[list[str] | None, typer.Argument(help="More flower-superlink arguments (after --).")] = None,
) -> None:
    """Start the SuperLink with TLS and SuperNode authentication (prints the command it runs)."""
    try:
        command = superlink_command(certs_dir, host, port, database, extra)
    except DeployError as err:
        raise _fail(err) from None
    _launch(command, dry_run)


@deploy.command()
def connection(
    address: Annotated[str, typer.Option("--address", help="HOST:PORT of the SuperLink, as the certificate names it.")],
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
        flwr = flower_executable("flwr")
    except DeployError as err:
        raise _fail(err) from None
    failed = 0
    for key in public_keys:
        command = [flwr, "supernode", "register", str(key), name, "--format", "json"]
        _show(command)
        done = subprocess.run(command, capture_output=True, text=True, env=flower_env(), check=False)
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


def _registered_node_id(stdout: str) -> int | None:
    """The node id in `flwr supernode register --format json` output (a JSON object)."""
    try:
        reply = json.loads(stdout[stdout.index("{") :])
    except ValueError:  # no "{", or not JSON
        return None
    return int(reply["node-id"]) if isinstance(reply, dict) and reply.get("success") and "node-id" in reply else None


@deploy.command()
def supernode(
    superlink_address: Annotated[str, typer.Option("--superlink", help="HOST:PORT of the SuperLink.")],
    private_key: Annotated[Path, typer.Option("--key", help="This SuperNode's private key (registered .pub).")],
    ca_cert: Annotated[Path, typer.Option("--ca", help="The deployment's CA certificate.")] = DEFAULT_CERTS / CA_CERT,
    data_path: Annotated[
        Path | None,
        typer.Option("--data-path", help="This device's data set: .csv, .jsonl or a saved Hugging Face data set folder."),
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
