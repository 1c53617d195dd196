"""Certificates and keys of a secured deployment: a CA, the SuperLink's TLS certificate, SuperNode key pairs.

Files `fedlora deploy certs` writes (`--out`, default deploy/certs):

    ca.crt, ca.key              the certificate authority (keep ca.key off the devices)
    server.crt, server.key      the SuperLink's TLS certificate and key
    supernodes/NAME.key, .pub   SuperNode key pairs (OpenSSH format, NIST P-384)

Private keys are written readable by their owner only (0600).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")  # the SuperLink's own processes connect here
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.crt", "server.key"
SUPERNODE_DIR = "supernodes"


class CertificateError(ValueError):
    """A certificate or key cannot be written as asked; the message says what to do."""


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


MAX_HOST_NAME = 253  # DNS: a name of at most 253 characters, labels of at most 63
MAX_COMMON_NAME = 64  # X.509 (RFC 5280 ub-common-name): the SuperLink certificate's subject
LAST_DAY = datetime.datetime(9999, 12, 31, tzinfo=datetime.UTC)  # X.509 times end with the year 9999


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
            check_host_name(host)
            if host not in names:
                names.append(host)
        else:
            if ip not in ips:
                ips.append(ip)
    return names, ips


def check_host_name(host: str) -> None:
    """Refuse what cannot be a DNS name in a certificate (CertificateError naming the --host)."""
    if not host.isascii():
        try:
            hint = f"give its ASCII (IDNA) form, --host {host.encode('idna').decode()}"
        except UnicodeError:
            hint = "give its ASCII (IDNA) form"
        raise CertificateError(f"--host {host!r}: a certificate names hosts in ASCII; {hint}")
    if len(host) > MAX_HOST_NAME:
        raise CertificateError(f"--host {host[:40]}...: {len(host)} characters; a host name has at most {MAX_HOST_NAME}")
    if not all(part and len(part) < 64 for part in host.split(".")) or " " in host:
        raise CertificateError(
            f"--host {host!r}: not a host name nor an IP address (a host name is dot-separated labels of 1 to 63 characters)"
        )


def validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    """The certificates' first and last moment, `days` from now (CertificateError naming --days if impossible)."""
    now = datetime.datetime.now(datetime.UTC)
    longest = (LAST_DAY - now).days
    if not 1 <= days <= longest:
        raise CertificateError(
            f"--days {days}: give 1 to {longest} (a certificate is valid for a day at least, and ends by the year 9999)"
        )
    return now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)


def refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise CertificateError(f"{', '.join(existing)} already exist(s); pass --force to replace, or choose another --out")


@dataclass(frozen=True)
class PendingFile:
    """A file to write: its bytes, and whether it is a private key (readable by its owner only)."""

    path: Path
    data: bytes
    private: bool = False


def write_files(files: list[PendingFile], force: bool = False, fix: str = "choose a folder you can write to (--out)") -> None:
    """Write every file or none: each goes beside its target first (NAME.partial), and only once
    all are written are they renamed into place. A file that cannot be written (read-only or
    missing folder, full disk) leaves the existing files as they were; CertificateError says
    where, then `fix`. The renames are atomic one by one, not together: if one fails after
    others succeeded (rare: the folder was just written to), the error names those replaced."""
    refuse_overwrite([file.path for file in files], force)
    staged: list[Path] = []
    replaced: list[Path] = []
    try:
        for file in files:
            file.path.parent.mkdir(parents=True, exist_ok=True)
            partial = file.path.with_name(file.path.name + ".partial")
            partial.unlink(missing_ok=True)  # a leftover of a write cut short: its mode may be wider
            staged.append(partial)
            _write_new(partial, file.data, 0o600 if file.private else 0o666)
        for partial, file in zip(staged, files):
            os.replace(partial, file.path)
            replaced.append(file.path)
    except OSError as err:
        for partial in staged:
            partial.unlink(missing_ok=True)
        # Name the file, not its stage (NAME.partial); a folder that cannot be made, by its own name.
        staging = err.filename is None or str(err.filename).endswith(".partial")
        where = file.path if staging else err.filename
        done = f"already replaced: {', '.join(p.name for p in replaced)}" if replaced else "nothing was replaced"
        raise CertificateError(f"cannot write {where}: {err.strerror or err}; {done}; {fix}") from None


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` (less the umask) and write `data` to it."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


def write_certificates(out: Path, hosts: list[str], days: int = 365, force: bool = False) -> CertificateFiles:
    """A self-signed CA and a SuperLink certificate it signs, valid for `hosts` and loopback."""
    files, pending = certificate_files(out, hosts, days)
    write_files(pending, force)
    return files


def write_supernode_key(out: Path, name: str, force: bool = False) -> KeyPair:
    """One SuperNode key pair: `NAME.key` (private, OpenSSH) and `NAME.pub` (what is registered)."""
    pair, pending = supernode_key_files(out, name)
    write_files(pending, force)
    return pair


def write_supernode_keys(out: Path, count: int, prefix: str = "supernode", force: bool = False) -> list[KeyPair]:
    """`count` key pairs named PREFIX-0, PREFIX-1, ... (all written, or none)."""
    pairs, pending = supernode_keys_files(out, count, prefix)
    write_files(pending, force)
    return pairs


def write_deployment(
    out: Path, hosts: list[str], days: int, supernodes: int, force: bool = False
) -> tuple[CertificateFiles, list[KeyPair]]:
    """What `fedlora deploy certs` writes: the CA, the SuperLink's certificate and `supernodes`
    key pairs in OUT/supernodes, all written or none."""
    files, pending = certificate_files(out, hosts, days)
    pairs, keys = supernode_keys_files(out / SUPERNODE_DIR, supernodes)
    write_files(pending + keys, force)
    return files, pairs


def certificate_files(out: Path, hosts: list[str], days: int) -> tuple[CertificateFiles, list[PendingFile]]:
    """The CA and the SuperLink's certificate and keys, made (not written yet)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    start, end = validity(days)
    names, ips = split_hosts(hosts)

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
    # Clients check the alternative names; the subject only has to fit X.509's 64 characters.
    common_name = next((host for host in names + ips if len(host) <= MAX_COMMON_NAME), "fedlora SuperLink")
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

    files = CertificateFiles(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY)
    pem, pkcs8, plain = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    return files, [
        PendingFile(files.ca_key, ca_key.private_bytes(pem, pkcs8, plain), private=True),
        PendingFile(files.ca_cert, ca_cert.public_bytes(pem)),
        PendingFile(files.server_key, server_key.private_bytes(pem, pkcs8, plain), private=True),
        PendingFile(files.server_cert, server_cert.public_bytes(pem)),
    ]


def supernode_key_files(out: Path, name: str) -> tuple[KeyPair, list[PendingFile]]:
    """A SuperNode key pair, made (not written yet)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not name or "/" in name or name.startswith("."):
        raise CertificateError(f"key name {name!r}: use a plain file name such as supernode-0")
    pair = KeyPair(out / f"{name}.key", out / f"{name}.pub")
    key = ec.generate_private_key(ec.SECP384R1())  # Flower accepts NIST EC curves for SuperNodes
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return pair, [PendingFile(pair.private, private, private=True), PendingFile(pair.public, public + f" {name}\n".encode())]


def supernode_keys_files(out: Path, count: int, prefix: str = "supernode") -> tuple[list[KeyPair], list[PendingFile]]:
    """`count` key pairs named PREFIX-0, PREFIX-1, ..., made (not written yet)."""
    made = [supernode_key_files(out, f"{prefix}-{i}") for i in range(count)]
    return [pair for pair, _ in made], [file for _, files in made for file in files]


# --- reading them back: the launchers check their files before Flower starts --------------------


def read_certificates(path: Path, option: str, fix: str) -> list[Any]:
    """The PEM certificates in `path` (a CA file may hold several); CertificateError naming the option if none."""
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(_read(path, option, fix))
    except ValueError:  # cryptography's reason is a link to its FAQ
        raise CertificateError(f"{option} {path}: holds no PEM certificate; {fix}") from None


def read_private_key(path: Path, option: str, fix: str, openssh: bool = False) -> Any:
    """The unencrypted private key in `path` (PEM, or OpenSSH with `openssh`); CertificateError naming the option if not one."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key

    try:
        return (load_ssh_private_key if openssh else load_pem_private_key)(_read(path, option, fix), None)
    except (ValueError, TypeError) as err:  # TypeError: the key is encrypted
        kind = "an OpenSSH" if openssh else "a PEM"
        raise CertificateError(f"{option} {path}: not {kind} private key without a passphrase ({err}); {fix}") from None


def check_key_pair(certificate: Path, key: Path, option: str, fix: str) -> None:
    """Refuse a TLS certificate and key that do not parse or do not belong together (TLS would fail as it starts)."""
    cert = read_certificates(certificate, option, fix)[0]
    private = read_private_key(key, option, fix)
    if cert.public_key() != private.public_key():
        raise CertificateError(f"{option} {key}: not the private key of {certificate}; {fix}")


def _read(path: Path, option: str, fix: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise CertificateError(f"{option} {path}: {err.strerror or err}; {fix}") from None
