"""The SuperLink process `fedlora deploy superlink` starts: Flower's SuperLink with each API on its own address.

flwr 1.41's `flower-superlink` serves its three APIs on one `--host:--port`:

    Fleet API     SuperNodes (TLS, and only registered keys with --enable-supernode-auth)
    Control API   the `flwr` CLI: register SuperNode keys, start and list runs, read their logs;
                  it has no user authentication in the open-source distribution
    Runtime API   the SuperLink's own ServerApp processes (each with a task token)

so whoever could reach the SuperNodes' port could also register a key of their own or submit a
run (whose code then runs on the server). Here the same app, built by flwr, is served on one
listening socket per address, and each socket answers only for the paths of the APIs given to
it (anything else gets 403):

    --fleet-address HOST:PORT     the Fleet API; required, no default: the operator names the
                                  interface the devices reach (or 0.0.0.0 for every interface)
    --control-address HOST:PORT   the Control API; 127.0.0.1:9093 unless asked otherwise
    --runtime-port PORT           the Runtime API, on 127.0.0.1 always (with flwr's
                                  `--isolation process`, run the SuperExec on this host)

The state file (`--database`) holds the registered keys and the runs' task tokens: it is created,
or corrected, readable by its owner only (0600) before Flower opens it; SQLite gives its journal
files the database file's permissions.

Every other argument goes to flwr's own `flower-superlink` parser unchanged (TLS files,
`--enable-supernode-auth`, `--database`, ...); `--host` and `--port` are this module's to set.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import stat
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FLEET, CONTROL, RUNTIME = "Fleet API", "Control API", "Runtime API"
PATHS = {FLEET: "/v1/fleet", CONTROL: "/v1/control", RUNTIME: "/v1/runtime"}
OPEN_PATHS = ("/health",)  # a liveness probe, on every address
LOOPBACK = "127.0.0.1"
FLEET_PORT, CONTROL_PORT, RUNTIME_PORT = 9092, 9093, 9091  # Flower's historical ports for these APIs
DEFAULT_CONTROL_ADDRESS = f"{LOOPBACK}:{CONTROL_PORT}"
IN_MEMORY = (":flwr-in-memory:", ":memory:", "sqlite:///:memory:")
# Set, these make flwr 1.41 start its old gRPC Control and Fleet servers on 0.0.0.0 as well.
LEGACY_GRPC_SWITCHES = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class SuperLinkError(RuntimeError):
    """The SuperLink cannot start as asked; the message names the option and what to do."""


@dataclass(frozen=True)
class Listener:
    """One listening socket and the APIs it answers for."""

    host: str
    port: int
    apis: frozenset[str]

    @property
    def address(self) -> str:
        """HOST:PORT, IPv6 hosts in brackets."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def split_address(text: str, option: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:9093) -> (host, port)."""
    host, colon, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SuperLinkError(f"{option} {text!r}: expected HOST:PORT, e.g. 192.168.1.10:{FLEET_PORT} or [::1]:{CONTROL_PORT}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback interface only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plan_listeners(fleet_address: str, control_address: str, runtime_port: int) -> list[Listener]:
    """The sockets to open: one per distinct address, the Runtime API on loopback.

    The Control API may share the Fleet API's socket only when both addresses are the same,
    the operator's explicit choice; two APIs on one port but different hosts are refused, since
    a socket on 0.0.0.0 would also take the other's connections."""
    wanted = [
        (split_address(fleet_address, "--fleet-address"), FLEET),
        (split_address(control_address, "--control-address"), CONTROL),
        ((LOOPBACK, runtime_port), RUNTIME),
    ]
    apis: dict[tuple[str, int], set[str]] = {}
    for address, api in wanted:
        apis.setdefault(address, set()).add(api)
    ports: dict[int, tuple[str, int]] = {}
    for address in apis:
        other = ports.setdefault(address[1], address)
        if other != address:
            raise SuperLinkError(
                f"{' and '.join(sorted(apis[other] | apis[address]))} on port {address[1]} with different hosts "
                f"({other[0]}, {address[0]}): give each its own port (--fleet-address, --control-address, --runtime-port)"
            )
    if len(apis[(LOOPBACK, runtime_port)]) > 1:
        raise SuperLinkError(f"--runtime-port {runtime_port}: already taken by another API's address; choose another port")
    return [Listener(host, port, frozenset(names)) for (host, port), names in apis.items()]


class ApiGate:
    """ASGI middleware: a request is served only on a socket whose APIs include its path."""

    def __init__(self, app: App, listeners: list[Listener]) -> None:
        self.app = app
        self.prefixes = {listener.port: tuple(PATHS[api] for api in listener.apis) for listener in listeners}

    def allows(self, port: int, path: str) -> bool:
        """Whether the socket on `port` answers for `path`."""
        prefixes = self.prefixes.get(port, ())
        return path in OPEN_PATHS or any(path == prefix or path.startswith(prefix + "/") for prefix in prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # uvicorn sets scope["server"] from the accepting socket, so its port says which listener it is.
        server = scope.get("server")
        if scope["type"] in ("http", "websocket") and not (server and self.allows(server[1], scope["path"])):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            body = b"not served on this address: the SuperLink serves each API on its own address\n"
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def database_path(database: str) -> Path | None:
    """The SQLite file of `--database`, None for an in-memory state."""
    if database in IN_MEMORY:
        return None
    if database.startswith("sqlite:///"):
        return Path(database.removeprefix("sqlite:///"))
    if "://" in database:
        raise SuperLinkError(f"--database {database!r}: give a file path (or :flwr-in-memory:)")
    return Path(database)


def secure_database(path: Path) -> list[Path]:
    """Create the state file (and its folder) for its owner only, or make the existing files so;
    returns the files whose permissions were corrected."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # SQLite takes an empty file as a new database
        return []
    corrected = []
    for file in [path, *(path.with_name(path.name + suffix) for suffix in ("-journal", "-wal", "-shm"))]:
        if file.exists() and stat.S_IMODE(file.stat().st_mode) & 0o077:
            file.chmod(0o600)
            corrected.append(file)
    return corrected


def flower_arguments(args: list[str]) -> list[str]:
    """flwr's own arguments, refused where they would undo the split (its --host and --port)."""
    for flag in ("--host", "--port", "--fleet-api-address", "--control-api-address"):
        if any(arg == flag or arg.startswith(flag + "=") for arg in args):
            raise SuperLinkError(f"{flag}: not with this launcher; use --fleet-address, --control-address, --runtime-port")
    return args


def bind(listener: Listener) -> socket.socket:
    """A listening TCP socket on the listener's address."""
    try:
        family, _, _, _, address = socket.getaddrinfo(listener.host, listener.port, type=socket.SOCK_STREAM)[0]
        return socket.create_server(address, family=family)
    except OSError as err:
        api = " + ".join(sorted(listener.apis))
        raise SuperLinkError(f"{api} on {listener.address}: {err.strerror or err}; choose another address or port") from None


def parse_arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This launcher's options, and the rest for flwr's parser."""
    parser = argparse.ArgumentParser(prog="python -m fedlora.superlink", description=__doc__.splitlines()[0])
    parser.add_argument("--fleet-address", required=True, help="HOST:PORT the SuperNodes connect to")
    parser.add_argument("--control-address", default=DEFAULT_CONTROL_ADDRESS, help="HOST:PORT of the Control API (flwr)")
    parser.add_argument("--runtime-port", type=int, default=RUNTIME_PORT, help="loopback port of the Runtime API")
    parser.add_argument("--database", default=":flwr-in-memory:", help="the state file (flwr's --database)")
    options, rest = parser.parse_known_args(argv)
    return options, flower_arguments(rest)


def superlink_app(listeners: list[Listener], flower_args: list[str], runtime_port: int) -> tuple[ApiGate, Any]:
    """flwr's SuperLink app, built from its own arguments, behind the gate; and flwr's config of it."""
    from flwr.superlink.cli.flower_superlink import SuperLinkLifespan, _parse_superlink_lifespan_config
    from flwr.superlink.main import create_app

    # flwr's parser reads sys.argv; the SuperExec it starts reaches the Runtime API at --host:--port.
    saved, sys.argv = sys.argv, ["flower-superlink", *flower_args, "--host", LOOPBACK, "--port", str(runtime_port)]
    try:
        config = _parse_superlink_lifespan_config()  # flwr 1.41's own checks and defaults (a private function)
    finally:
        sys.argv = saved
    return ApiGate(create_app(config, SuperLinkLifespan), listeners), config


def serve(listeners: list[Listener], sockets: list[socket.socket], flower_args: list[str], runtime_port: int) -> None:
    """Serve the SuperLink on `sockets` until stopped."""
    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler

    app, config = superlink_app(listeners, flower_args, runtime_port)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            ssl_keyfile=config.ssl_keyfile,
            ssl_certfile=config.ssl_certfile,
            log_config=get_uvicorn_log_config(console_handler.level),
            access_log=True,
            workers=1,  # the lifespan starts the SuperExec: once
        )
    )
    server.run(sockets=sockets)


def main(argv: list[str] | None = None) -> None:
    """Start the SuperLink: check the addresses, open the sockets, secure the state file, serve."""
    try:
        options, flower_args = parse_arguments(sys.argv[1:] if argv is None else argv)
        listeners = plan_listeners(options.fleet_address, options.control_address, options.runtime_port)
        for switch in LEGACY_GRPC_SWITCHES:
            os.environ.pop(switch, None)
        sockets = [bind(listener) for listener in listeners]
        path = database_path(options.database)
        if path is not None:
            for file in secure_database(path):
                print(f"{file} was readable by others: now 0600 (it holds SuperNode keys and task tokens)", flush=True)
            flower_args += ["--database", str(path.resolve())]
        else:
            flower_args += ["--database", options.database]
    except SuperLinkError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    for listener in listeners:
        print(f"{' + '.join(sorted(listener.apis))} on {listener.address}", flush=True)
    serve(listeners, sockets, flower_args, options.runtime_port)


if __name__ == "__main__":
    from fedlora.flower_process import run_to_the_end

    run_to_the_end(main)  # ends when the SuperLink does, whatever threads flwr left running
