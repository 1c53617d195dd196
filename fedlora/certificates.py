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
                raise CertificateError(f"--host {host!r}: not a host name nor an IP address") from None
            if host not in names:
                names.append(host)
        else:
            if ip not in ips:
                ips.append(ip)
    return names, ips


def refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise CertificateError(f"{', '.join(existing)} already exist(s); pass --force to replace, or choose another --out")


def write_private(path: Path, data: bytes) -> None:
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
    refuse_overwrite([files.ca_cert, files.ca_key, files.server_cert, files.server_key], force)
    if days < 1:
        raise CertificateError(f"--days {days}: a certificate must be valid for at least one day")
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
    write_private(files.ca_key, ca_key.private_bytes(pem, pkcs8, plain))
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    write_private(files.server_key, server_key.private_bytes(pem, pkcs8, plain))
    files.server_cert.write_bytes(server_cert.public_bytes(pem))
    return files


def write_supernode_key(out: Path, name: str, force: bool = False) -> KeyPair:
    """One SuperNode key pair: `NAME.key` (private, OpenSSH) and `NAME.pub` (what is registered)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not name or "/" in name or name.startswith("."):
        raise CertificateError(f"key name {name!r}: use a plain file name such as supernode-0")
    pair = KeyPair(out / f"{name}.key", out / f"{name}.pub")
    refuse_overwrite([pair.private, pair.public], force)
    key = ec.generate_private_key(ec.SECP384R1())  # Flower accepts NIST EC curves for SuperNodes
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_private(pair.private, private)
    pair.public.write_bytes(public + f" {name}\n".encode())
    return pair


def write_supernode_keys(out: Path, count: int, prefix: str = "supernode", force: bool = False) -> list[KeyPair]:
    """`count` key pairs named PREFIX-0, PREFIX-1, ..."""
    return [write_supernode_key(out, f"{prefix}-{i}", force) for i in range(count)]
