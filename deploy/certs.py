"""Throwaway credentials for a local or docker-compose deployment: a CA, a server certificate,
one authentication key pair per SuperNode, and the SuperExec shared secret.

    python -m deploy.certs DIR [--nodes N] [--san NAME ...] [--days D]

For demos and tests only: the CA key sits next to the certificates it signed. In production
use your organisation's CA and keep every private key on the machine that uses it.

What lands in DIR (made only when missing or no longer valid, so running it again is safe):

- ``ca.crt``, ``ca.key``: a self-signed CA (ECDSA P-384), the root every client trusts
  (``flower-supernode --root-certificates``, ``root-certificates`` in the ``flwr`` connection).
- ``server.pem``, ``server.key``: the SuperLink's certificate, signed by the CA. Its SANs are
  ``127.0.0.1``, ``::1``, ``localhost`` and ``superlink`` (the compose service name), plus every
  ``--san``. The SuperLink's own SuperExec connects to 127.0.0.1, so that one is required.
  Re-issued when the CA changed, a requested SAN is missing, or it expires within a day.
- ``nodes/node-<i>`` and ``nodes/node-<i>.pub`` for i in 0..N-1: ECDSA P-384 keys in OpenSSH
  format, the format ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register`` read.
- ``superexec.secret``: random bytes shared by the SuperLink and the SuperExec that connects
  to it in ``--isolation process`` (the compose layout).
- per SuperNode, for its own runtime API in ``--isolation process``: ``nodes/supernode-<i>.pem``
  and ``.key`` (a server certificate for ``supernode-<i>`` signed by the CA) and
  ``nodes/superexec-<i>.secret`` (shared with that site's SuperExec only). No SuperNode needs
  the SuperLink's key or another site's secret, and no container needs ``ca.key``.

Private keys are written with mode 0600. Docker's Flower images run as uid 49999: see
``deploy/compose/compose.yaml`` for the ``chown`` the mounted folder needs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import secrets
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("127.0.0.1", "::1", "localhost", "superlink")
DEFAULT_DAYS = 365
CURVE = ec.SECP384R1


@dataclass(frozen=True)
class Credentials:
    """Paths of everything :func:`ensure_credentials` made or found valid."""

    folder: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]  # private keys; the public key is the same path + ".pub"
    superexec_secret: Path
    node_runtime_certs: tuple[Path, ...] = ()  # nodes/supernode-<i>.pem (its .key beside it)
    node_superexec_secrets: tuple[Path, ...] = ()  # nodes/superexec-<i>.secret

    def node_public_key(self, index: int) -> Path:
        return self.node_keys[index].with_name(self.node_keys[index].name + ".pub")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret with mode 0600 from the start (no window where others may read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.replace(partial, path)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _load_ca(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ValueError(f"{key_path} is not the key of {cert_path}")
    if cert.not_valid_after_utc < _now() + dt.timedelta(days=1):
        raise ValueError(f"{cert_path} expires on {cert.not_valid_after_utc:%Y-%m-%d}")
    return cert, key


def _make_ca(days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Mosaic throwaway CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def _server_cert_valid(path: Path, ca: x509.Certificate, sans: Iterable[str]) -> bool:
    """Signed by this CA, not about to expire, and naming every requested SAN."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        ca_key = ca.public_key()
        assert isinstance(ca_key, ec.EllipticCurvePublicKey)
        assert cert.signature_hash_algorithm is not None
        ca_key.verify(
            cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
        )
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, InvalidSignature, x509.ExtensionNotFound):
        return False
    present = set(names)
    return all(
        _san_entry(name) in present for name in sans
    ) and cert.not_valid_after_utc > _now() + dt.timedelta(days=1)


def _make_server_cert(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, sans: list[str], days: int
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(CURVE())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(min(_now() + dt.timedelta(days=days), ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_san_entry(n) for n in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def _node_key_valid(private_path: Path, public_path: Path) -> bool:
    try:
        key = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
        public = serialization.load_ssh_public_key(public_path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(key, ec.EllipticCurvePrivateKey) and key.public_key() == public


def make_node_key(private_path: Path) -> Path:
    """A fresh ECDSA P-384 key pair in OpenSSH format; return the public key's path."""
    key = ec.generate_private_key(CURVE())
    public_path = private_path.with_name(private_path.name + ".pub")
    _write_private(
        private_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    _write_public(
        public_path,
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n",
    )
    return public_path


def ensure_credentials(
    folder: Path, nodes: int, extra_sans: Iterable[str] = (), days: int = DEFAULT_DAYS
) -> Credentials:
    """Make whatever of the credentials in ``folder`` is missing or invalid; keep the rest."""
    folder = folder.expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    sans = list(dict.fromkeys([*DEFAULT_SANS, *extra_sans]))
    ca_cert, ca_key = folder / "ca.crt", folder / "ca.key"
    server_cert, server_key = folder / "server.pem", folder / "server.key"

    try:
        ca, key = _load_ca(ca_cert, ca_key)
    except (OSError, ValueError):
        ca, key = _make_ca(days)
        _write_private(ca_key, _pem_key(key))
        _write_public(ca_cert, ca.public_bytes(serialization.Encoding.PEM))
        print(f"certs: new CA {ca_cert}")

    _ensure_server_cert(server_cert, server_key, ca, key, sans, days)

    node_keys, runtime_certs, node_secrets = [], [], []
    for index in range(nodes):
        private_path = folder / "nodes" / f"node-{index}"
        if not _node_key_valid(private_path, private_path.with_name(private_path.name + ".pub")):
            make_node_key(private_path)
            print(f"certs: new SuperNode key {private_path}")
        node_keys.append(private_path)
        runtime_cert = folder / "nodes" / f"supernode-{index}.pem"
        runtime_key = runtime_cert.with_suffix(".key")
        node_sans = [f"supernode-{index}", "127.0.0.1", "::1", "localhost"]
        _ensure_server_cert(runtime_cert, runtime_key, ca, key, node_sans, days)
        runtime_certs.append(runtime_cert)
        node_secrets.append(_ensure_secret(folder / "nodes" / f"superexec-{index}.secret"))

    secret = _ensure_secret(folder / "superexec.secret")
    return Credentials(
        folder=folder,
        ca_cert=ca_cert,
        ca_key=ca_key,
        server_cert=server_cert,
        server_key=server_key,
        node_keys=tuple(node_keys),
        superexec_secret=secret,
        node_runtime_certs=tuple(runtime_certs),
        node_superexec_secrets=tuple(node_secrets),
    )


def _ensure_server_cert(
    cert_path: Path,
    key_path: Path,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    sans: list[str],
    days: int,
) -> None:
    """A server certificate and key signed by the CA for ``sans``, made if missing or invalid."""
    if key_path.is_file() and _server_cert_valid(cert_path, ca, sans):
        return
    cert, cert_key = _make_server_cert(ca, ca_key, sans, days)
    _write_private(key_path, _pem_key(cert_key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    print(f"certs: new server certificate {cert_path} (SANs: {', '.join(sans)})")


def _ensure_secret(path: Path) -> Path:
    """Random bytes shared by a SuperLink or SuperNode and its SuperExec, made if missing."""
    if not path.is_file() or path.stat().st_size == 0:
        _write_private(path, secrets.token_hex(32).encode())
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.certs",
        description="Make a throwaway CA, server certificate and SuperNode keys (demos only).",
    )
    parser.add_argument("folder", type=Path, help="where the files go (made if missing)")
    parser.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs (default 3)")
    parser.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help=f"another host name or IP for the server certificate (always: {DEFAULT_SANS})",
    )
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity in days")
    args = parser.parse_args(argv)
    if args.nodes < 0 or args.days < 2:
        parser.error("--nodes must be >= 0 and --days >= 2")
    credentials = ensure_credentials(args.folder, args.nodes, args.san, args.days)
    print(f"certs: ready in {credentials.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
