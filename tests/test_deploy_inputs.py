"""`fedlora deploy` refuses what cannot work in one line, keeps what it had written, and never
leaves a Flower process waiting forever (issue 24, cases 7e and 8).

Tests run as root, where chmod does not stop a write: a write that fails is a path under a
file, or an OSError raised where the file is created.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from cryptography import x509

from fedlora.certificates import write_certificates, write_supernode_key
from fedlora.deploy import flower_env
from tests.conftest import one_line_refusal, run_cli

ROOT = Path(__file__).resolve().parent.parent
LONG_HOST = "a" * 40 + "." + "b" * 40  # 81 characters: a fine DNS name, too long for an X.509 common name


def refuse_creating(monkeypatch: pytest.MonkeyPatch, name_part: str) -> None:
    """From now on, creating a file whose name contains `name_part` fails as on a read-only disk."""
    real_open = os.open

    def open_or_refuse(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and name_part in os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_or_refuse)


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 7e: certs and connection ----------------------------------------------------------------


@pytest.mark.parametrize(
    "args, named",
    [
        (["--host", "hôst.lan"], "--host 'hôst.lan'"),
        (["--host", ".".join(["a" * 60] * 5)], "--host aaaa"),
        (["--days", "3000000"], "--days 3000000"),
        (["--days", "0"], "--days 0"),
    ],
    ids=["non-ascii-host", "host-over-253", "days-past-9999", "no-days"],
)
def test_a_host_or_validity_a_certificate_cannot_hold_is_refused_in_one_line(tmp_path: Path, args: list, named: str) -> None:
    line = one_line_refusal("deploy", "certs", "--out", str(tmp_path / "certs"), *args)
    assert named in line, line
    assert not (tmp_path / "certs").exists()


def test_a_non_ascii_host_is_told_its_ascii_form() -> None:
    assert "--host xn--hst-kna.lan" in one_line_refusal("deploy", "certs", "--host", "hôst.lan", "--out", "/nonexistent")


def test_a_host_name_longer_than_a_common_name_is_in_the_certificate(tmp_path: Path) -> None:
    code, output = run_cli("deploy", "certs", "--out", str(tmp_path), "--host", LONG_HOST)
    assert code == 0 and "Traceback" not in output, output
    server = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert LONG_HOST in names.get_values_for_type(x509.DNSName)
    assert len(server.subject.rfc4514_string()) <= 64 + len("CN=")


def test_an_out_folder_that_cannot_be_written_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    line = one_line_refusal("deploy", "certs", "--out", str(tmp_path / "a-file" / "certs"), "-n", "1")
    assert "cannot write" in line and "a-file" in line and "--out" in line, line


def test_certificates_that_cannot_all_be_written_replace_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_cli("deploy", "certs", "--out", str(tmp_path), "-n", "2")[0] == 0
    before = contents(tmp_path)
    refuse_creating(monkeypatch, "supernode-1.pub")  # the last file: every other one is written by then
    line = one_line_refusal("deploy", "certs", "--out", str(tmp_path), "-n", "2", "--force")
    assert "supernode-1.pub" in line and "nothing was replaced" in line, line
    assert contents(tmp_path) == before  # no file replaced, no partial file left


def test_a_flwr_home_that_cannot_be_written_is_refused_and_its_config_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_certificates(tmp_path / "certs", [])
    ca = str(tmp_path / "certs" / "ca.crt")
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "a-file" / "flwr"))
    line = one_line_refusal("deploy", "connection", "--ca", ca)
    assert "FLWR_HOME" in line and "a-file" in line, line

    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n[superlink.local]\naddress = ":local:"\n')
    before = contents(home)
    monkeypatch.setenv("FLWR_HOME", str(home))
    refuse_creating(monkeypatch, "config.toml")
    assert "FLWR_HOME" in one_line_refusal("deploy", "connection", "--ca", ca)
    assert contents(home) == before


# --- 8: the launchers check their files; Flower's processes end ------------------------------


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    write_certificates(tmp_path / "certs", [])
    write_supernode_key(tmp_path / "certs", "node")
    (tmp_path / "not-a-cert.pem").write_text("this is not a certificate\n")
    return tmp_path / "certs"


def supernode_args(ca: Path, key: Path) -> list[str]:
    node = ["--partition-id", "0", "--num-partitions", "3", "--dry-run"]
    return ["deploy", "supernode", "--superlink", "127.0.0.1:9092", "--ca", str(ca), "--key", str(key), *node]


def test_a_supernode_refuses_a_ca_or_key_that_does_not_parse(certs: Path) -> None:
    assert run_cli(*supernode_args(certs / "ca.crt", certs / "node.key"))[0] == 0
    line = one_line_refusal(*supernode_args(certs.parent / "not-a-cert.pem", certs / "node.key"))
    assert "--ca" in line and "not-a-cert.pem" in line and "no PEM certificate" in line, line
    line = one_line_refusal(*supernode_args(certs / "ca.crt", certs / "ca.crt"))  # a certificate, not its key
    assert "--key" in line and "node-key" in line, line


def test_a_superlink_refuses_certificates_that_do_not_parse_or_do_not_belong_together(certs: Path, tmp_path: Path) -> None:
    superlink = ["deploy", "superlink", "--certs", str(certs), "--fleet-address", "127.0.0.1:9092", "--dry-run"]
    assert run_cli(*superlink)[0] == 0
    (certs / "ca.crt").write_text("garbage\n")
    assert "ca.crt: holds no PEM certificate" in one_line_refusal(*superlink)
    write_certificates(tmp_path / "other", [])
    write_certificates(certs, [], force=True)
    (certs / "server.key").write_bytes((tmp_path / "other" / "server.key").read_bytes())
    assert "not the private key of" in one_line_refusal(*superlink)


def test_a_flower_supernode_whose_main_thread_fails_ends_with_its_code(certs: Path) -> None:
    """flower-supernode given what is not a certificate: its main thread fails after its Runtime API
    thread started; alone it waits forever, run through fedlora.flower_process it ends."""
    command = [sys.executable, "-m", "fedlora.flower_process", "flower-supernode", "--superlink", "127.0.0.1:9"]
    command += ["--root-certificates", str(certs.parent / "not-a-cert.pem")]
    command += ["--auth-supernode-private-key", str(certs / "node.key"), "--node-config", "partition-id=0 num-partitions=3"]
    command += ["--port", str(free_port())]
    process = subprocess.Popen(command, cwd=ROOT, env=flower_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = psutil.Process(process.pid)
    helpers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            helpers = [*{*helpers, *started.children(recursive=True)}]  # its SuperExec, before it ends
            time.sleep(0.2)
        assert process.poll() == 1, "the SuperNode did not end within 60 s"
        assert "cadata does not contain a certificate" in process.stdout.read()
        # The SuperExec it started watches its parent and ends on its own.
        gone, alive = psutil.wait_procs(helpers, timeout=20)
        assert not alive, f"left running: {alive}"
    finally:
        for leftover in [started, *helpers]:
            try:
                leftover.kill()
            except psutil.NoSuchProcess:
                pass


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
