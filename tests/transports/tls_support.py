"""Helpers of the ``tls`` layer's tests: certificates made with ``openssl`` once per run,
client contexts, a TLS client driven over a raw socket (which stays usable afterwards), and
the requirements on the real peers (``openssl``, ``curl``).

Imported by tests/transports/test_tls.py as ``tls_support`` (pytest puts this directory on
``sys.path``).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs

from support import requirement

OPENSSL = shutil.which("openssl")
CURL = shutil.which("curl")
requires_curl = requirement(CURL is not None, "requires_curl: the curl program")

#: The password of ``Certs.encrypted_key`` (the first line of ``Certs.password_file``).
PASSWORD = "correct horse"
#: Seconds any client step may take.
TIMEOUT = 10.0


@attrs.frozen
class Certs:
    """The test PKI: ECDSA P-256 keys, certificates valid for two days."""

    directory: Path
    ca: Path  # the CA clients and the server trust
    server: Path  # localhost, 127.0.0.1, ::1; signed by ca
    server_key: Path
    server_new: Path  # the same names, another serial: the certificate reload() swaps in
    server_new_key: Path
    other: Path  # other.test (an SNI name); signed by ca
    other_key: Path
    wild: Path  # *.wild.test
    wild_key: Path
    client: Path  # a client certificate signed by ca
    client_key: Path
    untrusted_ca: Path
    untrusted_client: Path  # a client certificate signed by untrusted_ca
    untrusted_client_key: Path
    encrypted_key: Path  # server_key, encrypted with PASSWORD
    password_file: Path
    wrong_password_file: Path
    combined: Path  # server certificate and key in one file


def der(cert: Path) -> bytes:
    """The (first) certificate in PEM file *cert*, as DER."""
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([str(OPENSSL), *args], cwd=cwd, check=True, capture_output=True, timeout=TIMEOUT)


def _key(name: str, cwd: Path) -> None:
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=cwd)


def _ca(name: str, cwd: Path) -> None:
    _key(name, cwd)
    _openssl("req", "-x509", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-days", "2",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign,cRLSign",
             "-out", f"{name}.pem", cwd=cwd)


def _leaf(name: str, cn: str, ca: str, ext: str, cwd: Path) -> None:
    _key(name, cwd)
    _openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={cn}", "-out", f"{name}.csr", cwd=cwd)
    (cwd / f"{name}.ext").write_text(ext + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-set_serial", str(int(time.time_ns() % 10**12)), "-days", "2",
             "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=cwd)


@functools.cache
def certs() -> Certs:
    """Make the test PKI (once per process) in a temporary directory removed at exit."""
    if OPENSSL is None:
        raise RuntimeError("requires_openssl: the openssl program")
    d = Path(tempfile.mkdtemp(prefix="tls-test-"))
    atexit.register(shutil.rmtree, d, True)
    server_ext = "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nextendedKeyUsage=serverAuth"
    _ca("ca", d)
    _ca("untrusted", d)
    _leaf("server", "localhost", "ca", server_ext, d)
    _leaf("server-new", "localhost", "ca", server_ext, d)
    _leaf("other", "other.test", "ca", "subjectAltName=DNS:other.test", d)
    _leaf("wild", "*.wild.test", "ca", "subjectAltName=DNS:*.wild.test", d)
    _leaf("client", "client", "ca", "extendedKeyUsage=clientAuth", d)
    _leaf("uclient", "untrusted client", "untrusted", "extendedKeyUsage=clientAuth", d)
    _openssl("ec", "-in", "server.key", "-aes256", "-passout", f"pass:{PASSWORD}",
             "-out", "server-encrypted.key", cwd=d)
    (d / "password").write_text(PASSWORD + "\nsecond line is not the password\n")
    (d / "wrong-password").write_text("not it\n")
    (d / "combined.pem").write_text((d / "server.pem").read_text() + (d / "server.key").read_text())
    return Certs(
        directory=d, ca=d / "ca.pem", server=d / "server.pem", server_key=d / "server.key",
        server_new=d / "server-new.pem", server_new_key=d / "server-new.key",
        other=d / "other.pem", other_key=d / "other.key", wild=d / "wild.pem", wild_key=d / "wild.key",
        client=d / "client.pem", client_key=d / "client.key", untrusted_ca=d / "untrusted.pem",
        untrusted_client=d / "uclient.pem", untrusted_client_key=d / "uclient.key",
        encrypted_key=d / "server-encrypted.key", password_file=d / "password",
        wrong_password_file=d / "wrong-password", combined=d / "combined.pem",
    )


def server_options(**more: Any) -> dict[str, Any]:
    """The ``tls`` options of a server with the test certificate, plus *more*."""
    c = certs()
    return {"certfile": str(c.server), "keyfile": str(c.server_key), **more}


def client_context(
    *, cert: Path | None = None, key: Path | None = None, version: str | None = None,
    alpn: list[str] | None = None, max_version: str | None = None,
) -> ssl.SSLContext:
    """A client context trusting the test CA; with a client certificate, a single TLS
    *version* ("1.2", "1.3"), or ALPN protocols when given."""
    context = ssl.create_default_context(cafile=str(certs().ca))
    versions = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
    if version is not None:
        context.minimum_version = context.maximum_version = versions[version]
    if max_version is not None:
        context.maximum_version = versions[max_version]
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


def handshake_over(sock: socket.socket, context: ssl.SSLContext, hostname: str = "localhost") -> ssl.SSLObject:
    """Run a TLS client handshake over *sock* through memory buffers, so that *sock* stays
    a plain socket (the kit reads it afterwards). Raises what the handshake raises."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=hostname)
    while True:
        try:
            tls.do_handshake()
            sock.sendall(outgoing.read())
            return tls
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            data = sock.recv(65536)
            if not data:
                incoming.write_eof()
            else:
                incoming.write(data)


def client_hello(hostname: str = "localhost") -> bytes:
    """The bytes of a TLS ClientHello as a Python client sends it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context().wrap_bio(incoming, outgoing, server_hostname=hostname)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def tls_connect(address: Any, context: ssl.SSLContext | None = None, hostname: str = "localhost",
                family: int = socket.AF_INET) -> ssl.SSLSocket:
    """A TLS client connected to *address* (handshake done)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        sock.connect(address)
        return (context or client_context()).wrap_socket(sock, server_hostname=hostname)
    except BaseException:
        sock.close()
        raise


def presented(tls: ssl.SSLSocket) -> bytes:
    """The certificate the server presented, as DER."""
    got = tls.getpeercert(binary_form=True)
    assert got is not None
    return got


def read_all(sock: Any) -> bytes:
    """Everything until EOF (a reset counts as EOF)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)
