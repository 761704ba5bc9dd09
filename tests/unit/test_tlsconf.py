"""ipc/tlsconf.py: a certificate and key that cannot serve HTTPS are a config error naming the file
and why; the contexts (server: TLS 1.2 at least; our clients: exactly our certificate) and the
GUI's address."""
from __future__ import annotations

import socket
import ssl
import threading

import pytest

from ipc import tlsconf
from ipc.config import Config, ConfigError
from tests.integration.tlskit import make_cert, make_chain, read_key, write_key


@pytest.fixture
def pair(tmp_path):
    return make_cert(tmp_path / "tls")


def cfg_for(tmp_path, **config) -> Config:
    """The config as loaded, without load_config's own check of the pair (that is what is tested)."""
    return Config(config_path=tmp_path / "config.json", **config)


def test_a_good_pair_gives_a_tls12_server_context(pair):
    ctx = tlsconf.check_pair(*pair)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize("case, words", [
    ("other key", "this key does not belong to the certificate"),
    ("missing key", "no such file"),
    ("key as cert", "not a PEM certificate"),
    ("cert as key", "not a PEM private key"),
    ("encrypted key", "encrypted with a passphrase"),
    ("garbled cert", "not a readable PEM certificate"),
])
def test_a_pair_that_cannot_serve_names_the_file_and_why(tmp_path, pair, case, words):
    cert, key = pair
    other_cert, other_key = make_cert(tmp_path / "other", stem="other")
    bad_file = {"other key": other_key, "missing key": tmp_path / "nope.key", "cert as key": other_cert,
                "encrypted key": tmp_path / "enc.key", "key as cert": key, "garbled cert": tmp_path / "bad.crt"}[case]
    if case == "encrypted key":
        write_key(bad_file, read_key(key), password=b"x")  # what `openssl pkey -aes256` writes
    if case == "garbled cert":
        bad_file.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    as_cert = case in ("key as cert", "garbled cert")
    with pytest.raises(ConfigError) as err:
        tlsconf.check_pair(bad_file if as_cert else cert, key if as_cert else bad_file)
    assert str(err.value).startswith(f"{bad_file}: ") and words in str(err.value)


def test_the_config_error_names_config_json_the_key_and_the_file(tmp_path, pair):
    cert, _ = pair
    _, other_key = make_cert(tmp_path / "other", stem="other")
    cfg = cfg_for(tmp_path, tls_cert="tls/server.crt", tls_key="other/other.key")
    with pytest.raises(ConfigError) as err:
        tlsconf.server_context(cfg)
    assert str(err.value) == (f"{tmp_path / 'config.json'}: key 'tls_key': {tmp_path / 'other' / 'other.key'}: "
                              f"this key does not belong to the certificate {cert}")
    only_key = cfg_for(tmp_path, tls_key="tls/server.key")
    with pytest.raises(ConfigError, match="key 'tls_cert': empty, but tls_key is set"):
        tlsconf.server_context(only_key)
    assert tlsconf.server_context(cfg_for(tmp_path)) is None


def test_the_key_may_sit_in_the_certificates_file(tmp_path, pair):
    cert, key = pair
    (tmp_path / "both.pem").write_text(cert.read_text() + key.read_text())
    assert tlsconf.server_context(cfg_for(tmp_path, tls_cert="both.pem")) is not None
    with pytest.raises(ConfigError, match="holds no private key; set tls_key"):
        tlsconf.server_context(cfg_for(tmp_path, tls_cert="tls/server.crt"))


def serve_once(ctx: ssl.SSLContext) -> tuple[int, threading.Thread, list]:
    """A one-connection TLS server on loopback; what it saw goes into the list."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list = []

    def run():
        conn, _ = listener.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                seen.append(tls.version())
                tls.sendall(b"hello")
        except (ssl.SSLError, OSError) as exc:
            seen.append(exc)
        finally:
            listener.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return port, thread, seen


def test_our_clients_trust_exactly_our_certificate_whatever_its_name(tmp_path, pair):
    cfg = cfg_for(tmp_path, tls_cert="tls/server.crt", tls_key="tls/server.key")
    port, thread, seen = serve_once(tlsconf.server_context(cfg))
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            tlsconf.client_context(cfg).wrap_socket(raw) as tls:  # the name is nas.lan; we dial 127.0.0.1
        assert tls.recv(5) == b"hello"
    thread.join(5)
    assert seen == ["TLSv1.3"]
    # Another certificate (a man in the middle with his own) is refused.
    other_cert, other_key = make_cert(tmp_path / "mitm", stem="mitm")
    port, thread, seen = serve_once(tlsconf.check_pair(other_cert, other_key))
    with socket.create_connection(("127.0.0.1", port)) as raw, pytest.raises(ssl.SSLCertVerificationError):
        tlsconf.client_context(cfg).wrap_socket(raw)
    thread.join(5)


def test_a_ca_issued_chain_without_its_root_is_trusted_as_configured(tmp_path):
    full, key, _root = make_chain(tmp_path / "chain")
    cfg = cfg_for(tmp_path, tls_cert="chain/fullchain.pem", tls_key="chain/leaf.key")
    port, thread, seen = serve_once(tlsconf.server_context(cfg))
    with socket.create_connection(("127.0.0.1", port)) as raw, tlsconf.client_context(cfg).wrap_socket(raw) as tls:
        assert tls.recv(5) == b"hello"
    thread.join(5)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_the_server_refuses_tls_older_than_12(tmp_path, pair):
    port, thread, seen = serve_once(tlsconf.check_pair(*pair))
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # the client itself would allow TLS 1.1
    old.minimum_version = ssl.TLSVersion.TLSv1_1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", port)) as raw, pytest.raises(ssl.SSLError):
        old.wrap_socket(raw)
    thread.join(5)
    assert isinstance(seen[0], ssl.SSLError) and "UNSUPPORTED_PROTOCOL" in str(seen[0])
    # The same client allowed TLS 1.2 gets in: the refusal was the version's.
    port, thread, seen = serve_once(tlsconf.check_pair(*pair))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", port)) as raw, old.wrap_socket(raw) as tls:
        assert tls.version() == "TLSv1.2"
    thread.join(5)


def test_the_gui_address(tmp_path, pair):
    assert tlsconf.gui_url(cfg_for(tmp_path, active_port=8123)) == "http://127.0.0.1:8123/gui"
    tls = {"tls_cert": "tls/server.crt", "tls_key": "tls/server.key", "active_port": 8123}
    assert tlsconf.gui_url(cfg_for(tmp_path, **tls)) == "https://127.0.0.1:8123/gui"
    # Listening on every interface, the link names the host the certificate is for.
    assert tlsconf.gui_url(cfg_for(tmp_path, bind="0.0.0.0", **tls)) == "https://nas.lan:8123/gui"
    assert tlsconf.gui_url(cfg_for(tmp_path, bind="192.168.1.10", **tls)) == "https://192.168.1.10:8123/gui"
    assert tlsconf.cert_names(pair[0]) == ["nas.lan", "127.0.0.1", "192.168.1.10"]


def test_an_expiring_certificate_is_named(tmp_path, pair):
    cfg = cfg_for(tmp_path, tls_cert="tls/server.crt", tls_key="tls/server.key")
    assert tlsconf.expiry_problem(cfg) is None  # 30 days left
    import time

    assert "expires on" in tlsconf.expiry_problem(cfg, now=time.time() + 20 * 86400)
    assert "expired on" in tlsconf.expiry_problem(cfg, now=time.time() + 40 * 86400)
