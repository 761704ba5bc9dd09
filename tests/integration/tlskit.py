"""Certificates made on the spot for tests, in-process with `cryptography` (no openssl command: the
default suite needs only Python and uv): self-signed for a LAN name, as the README's openssl
one-liner makes it, or a leaf issued through an intermediate CA, as a real CA's would be.
tests/debian/test_readme_cert.py checks the README's one-liner itself."""
from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEM = serialization.Encoding.PEM


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(name: str, ips) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName([x509.DNSName(name)] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer: str, issuer_key, days: int, extensions) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days)))
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


def write_key(path: Path, key, password: bytes | None = None) -> Path:
    """The key as PEM (PKCS#8), encrypted with `password` if one is given."""
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    path.write_bytes(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, encryption))
    return path


def read_key(path: Path):
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def make_cert(folder: Path, stem: str = "server", name: str = "nas.lan", ips=("127.0.0.1", "192.168.1.10"),
              days: int = 30) -> tuple[Path, Path]:
    """A self-signed certificate for `name` and `ips`: (cert.pem, key.pem), what the README's
    one-liner makes (EC P-256, CN and subjectAltName, no CA flag)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    key = _key()
    cert = _cert(name, key, name, key, days, [(_san(name, ips), False)])
    write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(PEM))
    return cert_path, key_path


def make_chain(folder: Path, name: str = "nas.lan", ips=("127.0.0.1",)) -> tuple[Path, Path, Path]:
    """A leaf issued by an intermediate issued by a root: (fullchain.pem = leaf + intermediate,
    no root, as Let's Encrypt's; leaf.key; root.crt)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = [(x509.BasicConstraints(ca=True, path_length=None), True),
          (x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                         encipher_only=False, decipher_only=False), True)]
    root_key, inter_key, leaf_key = _key(), _key(), _key()
    root = _cert("Test Root", root_key, "Test Root", root_key, 30, ca)
    inter = _cert("Test Intermediate", inter_key, "Test Root", root_key, 30, ca)
    leaf = _cert(name, leaf_key, "Test Intermediate", inter_key, 30,
                 [(x509.BasicConstraints(ca=False, path_length=None), False), (_san(name, ips), False),
                  (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
    full = folder / "fullchain.pem"
    full.write_bytes(leaf.public_bytes(PEM) + inter.public_bytes(PEM))
    (folder / "root.crt").write_bytes(root.public_bytes(PEM))
    return full, write_key(folder / "leaf.key", leaf_key), folder / "root.crt"
