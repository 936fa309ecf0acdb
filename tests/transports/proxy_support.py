"""Helpers of the PROXY-protocol tests: an encoder written from the specification apart
from the library's, a handler that reports what the layer gave it, servers, clients, and
HAProxy run in front (configuration in tmp_path, own session, torn down by PID).

Imported as ``proxy_support`` (the test files put this directory on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import support

import sockserve
from sockserve.transports._proxy import ProxyLayer

SIG = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])
requires_haproxy = support.requires_haproxy


# ------------------------------------------------------------------------------ an encoder


def crc32c_bitwise(data: bytes) -> int:
    """CRC-32C one bit at a time (RFC 4960 appendix B), to check the library's table."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


_TABLE = [crc32c_bitwise(bytes([n])) ^ crc32c_bitwise(b"\0") for n in range(256)]


def crc32c_fast(data: bytes) -> int:
    """The same, a byte at a time from a table derived from ``crc32c_bitwise`` (quick
    enough for generated headers)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def v2(ver_cmd: int, fam: int, body: bytes, *, crc: bool = False, length: int | None = None) -> bytes:
    """A version 2 header from its parts; *crc* appends a CRC32C TLV and fills it in."""
    if crc:
        body += tlv(0x03, b"\0\0\0\0")
    raw = SIG + bytes([ver_cmd, fam]) + struct.pack("!H", len(body) if length is None else length) + body
    if crc:
        raw = raw[:-4] + struct.pack("!I", crc32c_fast(raw))
    return raw


def inet4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (socket.inet_pton(socket.AF_INET, src) + socket.inet_pton(socket.AF_INET, dst)
            + struct.pack("!HH", sport, dport))


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
            + struct.pack("!HH", sport, dport))


def unix(src: bytes, dst: bytes) -> bytes:
    return src.ljust(108, b"\0") + dst.ljust(108, b"\0")


# ------------------------------------------------------------------------------ a reporting handler


def describe(client_address: Any) -> dict[str, Any]:
    """What a handler can tell of the client and its header, as JSON holds it."""
    header = getattr(client_address, "proxy", None)
    out: dict[str, Any] = {"client": list(client_address) if isinstance(client_address, tuple)
                           else client_address, "type": type(client_address).__name__}
    if header is not None:
        ssl = header.ssl
        out["proxy"] = {
            "version": header.version, "command": header.command, "family": header.family,
            "protocol": header.protocol,
            "source": list(header.source) if isinstance(header.source, tuple) else header.source,
            "destination": list(header.destination) if isinstance(header.destination, tuple)
            else header.destination,
            "tlvs": [[t, v.hex()] for t, v in header.tlvs],
            "alpn": header.alpn.decode() if header.alpn else None,
            "authority": header.authority,
            "unique_id": header.unique_id.decode("latin-1") if header.unique_id else None,
            "ssl": None if ssl is None else {"client": ssl.client, "verify": ssl.verify,
                                             "version": ssl.version, "cn": ssl.cn,
                                             "cipher": ssl.cipher},
        }
    return out


class ReportHandler(socketserver.BaseRequestHandler):
    """Reads the payload to EOF (or to a newline when ``line`` is set), replies one JSON
    line: the client, the header, the payload in hex."""

    line = False

    def handle(self) -> None:
        self.request.settimeout(10)
        data = b""
        while not (self.line and data.endswith(b"\n")):
            chunk = self.request.recv(65536)
            if not chunk:
                break
            data += chunk
        report = describe(self.client_address)
        report["payload"] = data.hex()
        report["pid"] = os.getpid()
        self.request.sendall(json.dumps(report).encode() + b"\n")


def compose(transport: str = "tcp", strategy: str = "threading", **options: Any) -> type:
    options.setdefault("header_timeout", 2.0)
    if strategy == "threadpool":
        options.setdefault("threads", 4)
    if strategy == "prefork":
        options.setdefault("workers", 2)
    return sockserve.compose(transport, strategy, layers=[ProxyLayer], options=options)


def bind_address(transport: str, tmp_path: Path) -> Any:
    if transport == "unix":
        return str(tmp_path / "proxy.sock")
    return support.address_for(transport, tmp_path)


@contextlib.contextmanager
def proxy_server(tmp_path: Path, transport: str = "tcp", strategy: str = "threading",
                 handler: type = ReportHandler, **options: Any) -> Iterator[Any]:
    cls = compose(transport, strategy, **options)
    server = cls(bind_address(transport, tmp_path), handler)
    with support.serving(server):
        yield server


def client(server: Any, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(server.address_family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(server.server_address)
    return sock


def ask(server: Any, *pieces: bytes, pause: float = 0.0) -> dict[str, Any] | None:
    """Send *pieces* (with *pause* between them), end the sending side; the JSON reply,
    or None when the server closed the connection without one."""
    with client(server) as sock:
        if sock.family != getattr(socket, "AF_UNIX", None):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i, piece in enumerate(pieces):
            if i and pause:
                time.sleep(pause)
            sock.sendall(piece)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            reply = support.read_to_eof(sock)
        except ConnectionResetError:
            return None
    return json.loads(reply) if reply else None


# ------------------------------------------------------------------------------ HAProxy


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def haproxy(tmp_path: Path, config: str, ready: list[tuple[Any, int]]) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``haproxy -f cfg -db`` with *config* (``support.running_haproxy``: own session,
    stopped by PID), and wait until each of *ready* (``(address, family)``) accepts."""
    with support.running_haproxy(tmp_path, config) as proc:
        for address, family in ready:
            deadline = time.monotonic() + 10
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"haproxy exited {proc.returncode}: "
                                         f"{(tmp_path / 'haproxy.log').read_text()}")
                try:
                    with socket.socket(family, socket.SOCK_STREAM) as probe:
                        probe.settimeout(1)
                        probe.connect(address)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        if proc.poll() is not None:
            raise AssertionError(f"haproxy exited {proc.returncode}: {(tmp_path / 'haproxy.log').read_text()}")
        yield proc


def ask_through(address: Any, family: int, payload: bytes = b"hello\n") -> dict[str, Any]:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(address)
        sock.sendall(payload)
        reply = support.read_to_eof(sock)
    assert reply, "no reply through haproxy"
    return dict(json.loads(reply))

