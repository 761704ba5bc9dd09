"""Certificates made on the spot with the openssl command (tests only): self-signed for a LAN
name, or a leaf issued through an intermediate CA, as a real CA's would be."""
from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    out = subprocess.run(["openssl", *args], cwd=str(cwd), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def _san(name: str, ips) -> str:
    return ",".join([f"DNS:{name}"] + [f"IP:{ip}" for ip in ips])


def make_cert(folder: Path, stem: str = "server", name: str = "nas.lan", ips=("127.0.0.1", "192.168.1.10"),
              days: int = 30) -> tuple[Path, Path]:
    """A self-signed certificate for `name` and `ips`: (cert.pem, key.pem), the README's one-liner."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{stem}.crt", folder / f"{stem}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key.name,
             "-out", cert.name, "-days", str(days), "-subj", f"/CN={name}", "-addext",
             f"subjectAltName={_san(name, ips)}", cwd=folder)
    return cert, key


def make_chain(folder: Path, name: str = "nas.lan", ips=("127.0.0.1",)) -> tuple[Path, Path, Path]:
    """A leaf issued by an intermediate issued by a root: (fullchain.pem = leaf + intermediate,
    no root, as Let's Encrypt's; leaf.key; root.crt)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_ext = folder / "ca.ext"
    ca_ext.write_text("basicConstraints=critical,CA:true\nkeyUsage=critical,keyCertSign,cRLSign\n")
    leaf_ext = folder / "leaf.ext"
    leaf_ext.write_text(f"basicConstraints=CA:false\nsubjectAltName={_san(name, ips)}\n"
                        "extendedKeyUsage=serverAuth\n")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "root.key", "-out", "root.crt", "-days", "30", "-subj", "/CN=Test Root",
             "-addext", "basicConstraints=critical,CA:true", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)
    _openssl("req", "-new", *ec, "-keyout", "inter.key", "-out", "inter.csr", "-subj", "/CN=Test Intermediate",
             cwd=folder)
    _openssl("x509", "-req", "-in", "inter.csr", "-CA", "root.crt", "-CAkey", "root.key", "-CAcreateserial",
             "-out", "inter.crt", "-days", "30", "-extfile", ca_ext.name, cwd=folder)
    _openssl("req", "-new", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", f"/CN={name}", cwd=folder)
    _openssl("x509", "-req", "-in", "leaf.csr", "-CA", "inter.crt", "-CAkey", "inter.key", "-CAcreateserial",
             "-out", "leaf.crt", "-days", "30", "-extfile", leaf_ext.name, cwd=folder)
    full = folder / "fullchain.pem"
    full.write_text((folder / "leaf.crt").read_text() + (folder / "inter.crt").read_text())
    return full, folder / "leaf.key", folder / "root.crt"
