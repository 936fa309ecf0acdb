"""The PROXY protocol header, versions 1 and 2, parsed from bytes (no sockets here).

Charter (this module is the parser the ``proxy`` layer is built on, and may pass 400 lines):
the letter of HAProxy's ``proxy-protocol.txt`` (revision 2020/03/05), strictly. It holds
``ProxyHeader`` (what a header says), ``SSLInfo`` (its ``PP2_TYPE_SSL`` TLV),
``ProxyHeaderError`` (why bytes are not a header), ``NeedMore`` (a valid prefix),
``parse`` (bytes -> one of those), ``build_v1`` / ``build_v2`` (the sender's side, for
tests and tools) and ``crc32c`` (RFC 4960 appendix B, table-driven: the stdlib has none).

``parse(data)`` looks at the start of *data* only: it returns ``NeedMore`` while *data* is
a strict prefix of some valid header (every byte of *data* then belongs to the header, so a
reader may consume them all), a ``ProxyHeader`` whose ``raw`` is the header when *data*
starts with a complete one (bytes after it are payload, untouched), or raises
``ProxyHeaderError`` as soon as *data* cannot start a valid header. The choices where the
specification leaves room, each the strict one:

- v1: exactly one space between fields; IPv4 as four decimal numbers 0-255 without
  leading zeros; IPv6 as hexadecimal groups and colons only (no dotted IPv4 suffix, no
  zone); ports ASCII digits 0-65535 without leading zeros; ``TCP4`` and ``TCP6`` lines
  of any other character are refused at once. After ``UNKNOWN`` comes CRLF or a space
  and then anything but CR or LF, ignored. A CR or LF anywhere but in the final CRLF is
  refused; the CRLF must end within 107 bytes.
- v2: version 2 only; commands LOCAL and PROXY; the protocol byte one of the seven the
  specification lists (0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32), for LOCAL too; the
  length at least the family's address block and at most *max_length*; TLVs walked to
  the end exactly; PP2_TYPE_CRC32C (exactly 4 bytes) checked; PP2_TYPE_UNIQUE_ID at most
  128 bytes; the SSL TLV's sub-TLVs walked within it; the registered single-valued TLV
  types (ALPN, AUTHORITY, CRC32C, UNIQUE_ID, SSL, NETNS) at most once each. Text fields
  (authority, SSL version, CN, cipher) are decoded with replacement characters: their
  encoding is not framing.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import struct
from typing import Any

__all__ = [
    "SIGNATURE",
    "V1_MAX",
    "NeedMore",
    "ProxyHeader",
    "ProxyHeaderError",
    "SSLInfo",
    "build_v1",
    "build_v2",
    "crc32c",
    "parse",
]

#: The 12 bytes every version 2 header starts with.
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The longest version 1 line, CRLF included.
V1_MAX = 107
#: The fixed part of a version 2 header: signature, version/command, family, length.
V2_FIXED = 16
#: The largest version 2 header the length field can describe.
V2_MAX = V2_FIXED + 0xFFFF

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04
_SINGLE = frozenset({PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, PP2_TYPE_CRC32C, PP2_TYPE_UNIQUE_ID,
                     PP2_TYPE_SSL, PP2_TYPE_NETNS})

FAMILIES = {0x0: "UNSPEC", 0x1: "INET", 0x2: "INET6", 0x3: "UNIX"}
PROTOCOLS = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}
_FAMILY_CODE = {name: code for code, name in FAMILIES.items()}
_PROTOCOL_CODE = {name: code for code, name in PROTOCOLS.items()}
#: The protocol bytes the specification lists, and each one's address block size.
_BLOCK = {0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
_COMMANDS = {0x0: "LOCAL", 0x1: "PROXY"}

_DIGITS = frozenset(b"0123456789")
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IPV4 = rb"(" + _OCTET + rb"(?:\." + _OCTET + rb"){3})"
_PORT = rb"(0|[1-9][0-9]{0,4})"
#: A whole valid TCP4 line (but for ports above 65535, checked after).
_V1_TCP4 = re.compile(rb"PROXY TCP4 " + _IPV4 + rb" " + _IPV4 + rb" " + _PORT + rb" " + _PORT + rb"\r\n")
#: PROXY, TCP over IPv4, 12 address bytes and no TLV: the usual v2 header (28 bytes).
_V2_TCP4 = SIGNATURE + b"\x21\x11\x00\x0c"
_V2_INET = struct.Struct("!4s4sHH")
_AF_INET = int(socket.AF_INET)
_ntop = socket.inet_ntop
_HEX = frozenset(b"0123456789abcdefABCDEF")
_V1_CHARS = {b"TCP4": frozenset(b"0123456789. "), b"TCP6": frozenset(b"0123456789abcdefABCDEF: ")}


class ProxyHeaderError(ValueError):
    """*data* is not a valid PROXY protocol header.

    :ivar reason: ``"header"`` (not a header by the specification) or ``"version"`` (a
        version that is not enabled, or a binary version other than 2).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class NeedMore:
    """*data* is a strict prefix of a valid header: all of it belongs to the header.

    :ivar at_most: how many more bytes the header can have at most (exactly that many
        once ``exact`` is true: a version 2 header whose length was read).
    """

    at_most: int
    exact: bool = False


@dataclasses.dataclass(frozen=True)
class SSLInfo:
    """The ``PP2_TYPE_SSL`` TLV: how the client connected to the proxy."""

    #: The ``client`` bit field (``PP2_CLIENT_SSL`` 1, ``_CERT_CONN`` 2, ``_CERT_SESS`` 4).
    client: int
    #: 0 when the client presented a certificate that was verified, else non-zero.
    verify: int
    #: The sub-TLVs as sent, in order: ``(type, value)``.
    tlvs: tuple[tuple[int, bytes], ...] = ()

    def _text(self, kind: int, encoding: str = "ascii") -> str | None:
        for t, value in self.tlvs:
            if t == kind:
                return value.decode(encoding, "replace")
        return None

    @property
    def ssl(self) -> bool:
        """The client connected over SSL/TLS."""
        return bool(self.client & PP2_CLIENT_SSL)

    @property
    def cert_conn(self) -> bool:
        """The client presented a certificate on this connection."""
        return bool(self.client & PP2_CLIENT_CERT_CONN)

    @property
    def cert_sess(self) -> bool:
        """The client presented a certificate at least once in this TLS session."""
        return bool(self.client & PP2_CLIENT_CERT_SESS)

    @property
    def version(self) -> str | None:
        """``PP2_SUBTYPE_SSL_VERSION``: ``"TLSv1.3"``."""
        return self._text(PP2_SUBTYPE_SSL_VERSION)

    @property
    def cn(self) -> str | None:
        """``PP2_SUBTYPE_SSL_CN``: the client certificate's Common Name."""
        return self._text(PP2_SUBTYPE_SSL_CN, "utf-8")

    @property
    def cipher(self) -> str | None:
        """``PP2_SUBTYPE_SSL_CIPHER``."""
        return self._text(PP2_SUBTYPE_SSL_CIPHER)

    @property
    def sig_alg(self) -> str | None:
        """``PP2_SUBTYPE_SSL_SIG_ALG``."""
        return self._text(PP2_SUBTYPE_SSL_SIG_ALG)

    @property
    def key_alg(self) -> str | None:
        """``PP2_SUBTYPE_SSL_KEY_ALG``."""
        return self._text(PP2_SUBTYPE_SSL_KEY_ALG)


@dataclasses.dataclass(slots=True)
class ProxyHeader:
    """One PROXY protocol header, as the proxy sent it (read-only by convention: not
    frozen, since a frozen dataclass costs microseconds per connection to build).

    ``source`` and ``destination`` are addresses as the socket module writes them:
    ``(host, port)`` for INET, ``(host, port, 0, 0)`` for INET6, a path ``str`` for UNIX
    (``""`` unnamed, starting with NUL for an abstract address, undecodable bytes as
    ``os.fsdecode`` gives them); None when the header carries
    none (LOCAL with no address, v1 ``UNKNOWN``, the UNSPEC family or protocol).
    """

    #: 1 or 2.
    version: int
    #: ``"PROXY"`` (relayed: use ``source``) or ``"LOCAL"`` (v2 only: the proxy's own
    #: connection, a health check). A v1 header's command is ``"PROXY"``.
    command: str
    #: ``"UNSPEC"``, ``"INET"``, ``"INET6"`` or ``"UNIX"`` (v1: TCP4 INET, TCP6 INET6,
    #: UNKNOWN UNSPEC).
    family: str
    #: ``"UNSPEC"``, ``"STREAM"`` or ``"DGRAM"``.
    protocol: str
    source: Any
    destination: Any
    #: The version 2 TLVs as sent, in order, NOOP included: ``(type, value)``.
    tlvs: tuple[tuple[int, bytes], ...]
    #: The header's bytes, exactly: ``len(raw)`` bytes of the stream were the header.
    raw: bytes = dataclasses.field(repr=False)

    @property
    def proxied(self) -> bool:
        """True when ``source`` is the original client's address (PROXY with addresses)."""
        return self.command == "PROXY" and self.source is not None

    def tlv(self, kind: int) -> bytes | None:
        """The value of the first TLV of type *kind*, or None."""
        for t, value in self.tlvs:
            if t == kind:
                return value
        return None

    @property
    def alpn(self) -> bytes | None:
        """``PP2_TYPE_ALPN``: the protocol the client negotiated (``b"h2"``)."""
        return self.tlv(PP2_TYPE_ALPN)

    @property
    def authority(self) -> str | None:
        """``PP2_TYPE_AUTHORITY``: the host name the client asked for (TLS SNI)."""
        value = self.tlv(PP2_TYPE_AUTHORITY)
        return None if value is None else value.decode("utf-8", "replace")

    @property
    def unique_id(self) -> bytes | None:
        """``PP2_TYPE_UNIQUE_ID``: the proxy's identifier of the connection."""
        return self.tlv(PP2_TYPE_UNIQUE_ID)

    @property
    def netns(self) -> str | None:
        """``PP2_TYPE_NETNS``: the network namespace's name."""
        value = self.tlv(PP2_TYPE_NETNS)
        return None if value is None else value.decode("ascii", "replace")

    @property
    def crc32c(self) -> int | None:
        """The ``PP2_TYPE_CRC32C`` checksum sent (already verified), or None."""
        value = self.tlv(PP2_TYPE_CRC32C)
        return None if value is None else int.from_bytes(value, "big")

    @property
    def ssl(self) -> SSLInfo | None:
        """The ``PP2_TYPE_SSL`` TLV, or None."""
        value = self.tlv(PP2_TYPE_SSL)
        return None if value is None else _ssl_info(value)


# ------------------------------------------------------------------------------ CRC32C


def _crc_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli, RFC 4960 appendix B) of *data*, continuing from *crc*."""
    table = _CRC_TABLE
    c = crc ^ 0xFFFFFFFF
    for byte in data:
        c = table[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


# ------------------------------------------------------------------------------ parsing


def _bad(message: str) -> ProxyHeaderError:
    return ProxyHeaderError("header", message)


def parse(
    data: bytes, versions: frozenset[int] = frozenset({1, 2}), max_length: int = V2_MAX
) -> ProxyHeader | NeedMore:
    """The PROXY header at the start of *data*, or ``NeedMore`` while *data* is too short.

    :param versions: the versions accepted; a header of another one raises
        ``ProxyHeaderError("version")``.
    :param max_length: the longest version 2 header accepted, fixed part included.
    :raises ProxyHeaderError: as soon as *data* cannot start a valid header.
    """
    if not data:
        return NeedMore(max(V1_MAX if 1 in versions else 0, max_length if 2 in versions else 0))
    first = data[0]
    if first == 0x50:  # "P"
        fast = _V1_TCP4.match(data) if 1 in versions else None
        if fast is not None:  # the usual line in one step (the slow path agrees)
            s_host, d_host, s_port, d_port = fast.groups()
            sp, dp = int(s_port), int(d_port)  # ASCII digits only: the pattern says so
            if sp <= 0xFFFF and dp <= 0xFFFF:
                raw = fast.group(0)
                return ProxyHeader(1, "PROXY", "INET", "STREAM", (s_host.decode(), sp),
                                   (d_host.decode(), dp), (),
                                   raw if type(raw) is bytes else bytes(raw))
        if not data.startswith(b"PROXY"[: len(data)]):
            raise _bad(f"not a PROXY header: {bytes(data[:8])!r}")
        if 1 not in versions and len(data) >= 5:
            raise ProxyHeaderError("version", "a version 1 header; version 1 is not enabled")
        return _parse_v1(data)
    if first == 0x0D:
        if data[:16] == _V2_TCP4 and len(data) >= 28 and 2 in versions and max_length >= 28:
            # The usual header (TCP over IPv4, no TLV) in one step (_parse_v2 agrees).
            s, d, sp, dp = _V2_INET.unpack_from(data, V2_FIXED)
            return ProxyHeader(2, "PROXY", "INET", "STREAM", (_ntop(_AF_INET, s), sp),
                               (_ntop(_AF_INET, d), dp), (), bytes(data[:28]))
        n = min(len(data), len(SIGNATURE))
        if data[:n] != SIGNATURE[:n]:
            raise _bad(f"not a PROXY header: {bytes(data[:12])!r}")
        if 2 not in versions and len(data) >= len(SIGNATURE):
            raise ProxyHeaderError("version", "a version 2 header; version 2 is not enabled")
        return _parse_v2(data, max_length)
    raise _bad(f"not a PROXY header: {bytes(data[:8])!r}")


def _parse_v1(data: bytes) -> ProxyHeader | NeedMore:
    if not data.startswith(b"PROXY "[: len(data)]):
        raise _bad("v1: no single space after PROXY")
    window = data[:V1_MAX]
    cr = window.find(b"\r")
    lf = window.find(b"\n")
    if lf != -1 and (cr == -1 or lf < cr):
        raise _bad("v1: a LF without CR")
    if cr == -1 or cr + 1 == len(window):
        end = -1
    elif window[cr + 1] != 0x0A:
        raise _bad("v1: a CR without LF")
    else:
        end = cr + 2
    if end == -1:
        _check_v1_prefix(window, complete=False)
        if len(window) >= V1_MAX:
            raise _bad(f"v1: no CRLF within {V1_MAX} bytes")
        return NeedMore(V1_MAX - len(window))
    line = bytes(window[:end])
    _check_v1_prefix(line, complete=True)
    return _v1_fields(line)


def _check_v1_prefix(line: bytes, complete: bool) -> None:
    """Refuse a v1 line as early as its protocol word (and characters) allow."""
    body = line[:-2] if complete else line.rstrip(b"\r")  # a CR last: its LF may follow
    word = body[6:]
    for proto in (b"TCP4", b"TCP6", b"UNKNOWN"):
        if word[: len(proto)] == proto[: len(word)]:
            break
    else:
        raise _bad(f"v1: unknown protocol {bytes(word[:8])!r}")
    if len(word) < len(proto):
        if complete:
            raise _bad(f"v1: unknown protocol {bytes(word)!r}")
        return
    rest = word[len(proto):]
    if rest and rest[0] != 0x20:
        raise _bad(f"v1: unknown protocol {bytes(word[:8])!r}")
    if proto != b"UNKNOWN":
        allowed = _V1_CHARS[proto]
        for byte in rest:
            if byte not in allowed:
                raise _bad(f"v1: {chr(byte)!r} in a {proto.decode()} line")


def _v1_fields(line: bytes) -> ProxyHeader:
    body = line[6:-2]
    if body == b"UNKNOWN" or body.startswith(b"UNKNOWN "):
        return ProxyHeader(1, "PROXY", "UNSPEC", "UNSPEC", None, None, (), line)
    parts = body.split(b" ")
    if len(parts) != 5 or not all(parts):
        raise _bad("v1: expected '<proto> <src> <dst> <sport> <dport>' with single spaces")
    proto, src, dst, sport, dport = parts
    if proto == b"TCP4":
        family, host = "INET", _v1_ipv4
    else:
        family, host = "INET6", _v1_ipv6
    s_host, d_host = host(src), host(dst)
    s_port, d_port = _v1_port(sport), _v1_port(dport)
    if family == "INET":
        source: tuple[Any, ...] = (s_host, s_port)
        destination: tuple[Any, ...] = (d_host, d_port)
    else:
        source, destination = (s_host, s_port, 0, 0), (d_host, d_port, 0, 0)
    return ProxyHeader(1, "PROXY", family, "STREAM", source, destination, (), line)


def _v1_decimal(field: bytes, maximum: int, what: str) -> int:
    if not 1 <= len(field) <= len(str(maximum)) or not all(b in _DIGITS for b in field):
        raise _bad(f"v1: bad {what} {field!r}")
    if len(field) > 1 and field[0] == 0x30:
        raise _bad(f"v1: leading zero in {what} {field!r}")
    value = 0
    for b in field:
        value = value * 10 + (b - 0x30)
    if value > maximum:
        raise _bad(f"v1: {what} {field!r} out of range")
    return value


def _v1_port(field: bytes) -> int:
    return _v1_decimal(field, 0xFFFF, "port")


def _v1_ipv4(field: bytes) -> str:
    octets = field.split(b".")
    if len(octets) != 4:
        raise _bad(f"v1: bad IPv4 address {field!r}")
    return ".".join(str(_v1_decimal(o, 255, "IPv4 address part")) for o in octets)


def _v1_ipv6(field: bytes) -> str:
    if not all(b in _HEX or b == 0x3A for b in field):
        raise _bad(f"v1: bad IPv6 address {field!r}")
    try:  # inet_pton: hexadecimal groups of 1-4 digits, at most one "::", 128 bits
        return _ntop6(socket.inet_pton(socket.AF_INET6, field.decode("ascii")))
    except (OSError, ValueError):
        raise _bad(f"v1: bad IPv6 address {field!r}") from None


def _ntop6(packed: bytes) -> str:
    """An IPv6 address as the socket module shows a peer's (``inet_ntop``)."""
    return socket.inet_ntop(socket.AF_INET6, packed)




def _parse_v2(data: bytes, max_length: int) -> ProxyHeader | NeedMore:
    if len(data) < V2_FIXED:
        return NeedMore(max_length - len(data))
    ver_cmd, fam = data[12], data[13]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError("version", f"v2: binary version {ver_cmd >> 4}, not 2")
    command = _COMMANDS.get(ver_cmd & 0xF)
    if command is None:
        raise _bad(f"v2: unassigned command {ver_cmd & 0xF:#x}")
    if fam >> 4 not in FAMILIES or fam & 0xF not in PROTOCOLS:
        raise _bad(f"v2: unassigned family or protocol {fam:#04x}")
    block = _BLOCK.get(fam)
    if block is None:
        raise _bad(f"v2: family and protocol {fam:#04x} are not a combination the specification lists")
    (length,) = struct.unpack_from("!H", data, 14)
    total = V2_FIXED + length
    if total > max_length:
        raise _bad(f"v2: header of {total} bytes, more than the {max_length} accepted")
    if length < block:
        raise _bad(f"v2: length {length} is shorter than the {block}-byte address block")
    if len(data) < total:
        return NeedMore(total - len(data), exact=True)
    raw = bytes(data[:total])
    family, protocol = FAMILIES[fam >> 4], PROTOCOLS[fam & 0xF]
    source, destination = _v2_addresses(raw, fam, family)
    tlvs = _walk(raw, V2_FIXED + block, total, "TLV")
    _check_tlvs(raw, tlvs)
    return ProxyHeader(2, command, family, protocol, source, destination,
                       tuple((t, bytes(raw[a:b])) for t, a, b in tlvs), raw)


def _v2_addresses(raw: bytes, fam: int, family: str) -> tuple[Any, Any]:
    if fam == 0x00:
        return None, None
    at = V2_FIXED
    if family == "INET":
        s, d, sp, dp = _V2_INET.unpack_from(raw, at)
        return (socket.inet_ntop(socket.AF_INET, s), sp), (socket.inet_ntop(socket.AF_INET, d), dp)
    if family == "INET6":
        s, d, sp, dp = struct.unpack_from("!16s16sHH", raw, at)
        return (_ntop6(s), sp, 0, 0), (_ntop6(d), dp, 0, 0)
    return _unix_path(raw[at:at + 108]), _unix_path(raw[at + 108:at + 216])


def _unix_path(block: bytes) -> str:
    if block[:1] == b"\x00":  # the abstract namespace (or unnamed: all NULs, "")
        name = block[1:].rstrip(b"\x00")
        return "\x00" + os.fsdecode(name) if name else ""
    return os.fsdecode(block.split(b"\x00", 1)[0])


def _walk(raw: bytes, start: int, end: int, what: str) -> list[tuple[int, int, int]]:
    """``(type, value start, value end)`` of each TLV from *start*, which must end at *end*."""
    found = []
    at = start
    while at < end:
        if end - at < 3:
            raise _bad(f"v2: a truncated {what} ({end - at} bytes left)")
        kind = raw[at]
        size = (raw[at + 1] << 8) | raw[at + 2]
        if at + 3 + size > end:
            raise _bad(f"v2: {what} type {kind:#04x} of {size} bytes overruns the header")
        found.append((kind, at + 3, at + 3 + size))
        at += 3 + size
    return found


def _check_tlvs(raw: bytes, tlvs: list[tuple[int, int, int]]) -> None:
    seen: set[int] = set()
    for kind, a, b in tlvs:
        if kind in _SINGLE:
            if kind in seen:
                raise _bad(f"v2: TLV type {kind:#04x} twice")
            seen.add(kind)
        if kind == PP2_TYPE_CRC32C:
            if b - a != 4:
                raise _bad(f"v2: a CRC32C TLV of {b - a} bytes, not 4")
            computed = crc32c(raw[:a] + b"\x00\x00\x00\x00" + raw[b:])
            if computed != int.from_bytes(raw[a:b], "big"):
                raise _bad("v2: CRC32C mismatch")
        elif kind == PP2_TYPE_UNIQUE_ID and b - a > 128:
            raise _bad(f"v2: a unique ID of {b - a} bytes, more than 128")
        elif kind == PP2_TYPE_SSL:
            _ssl_info(raw[a:b])


def _ssl_info(value: bytes) -> SSLInfo:
    if len(value) < 5:
        raise _bad(f"v2: an SSL TLV of {len(value)} bytes, less than 5")
    client, verify = struct.unpack_from("!BI", value)
    subs = _walk(value, 5, len(value), "SSL sub-TLV")
    return SSLInfo(client, verify, tuple((t, bytes(value[a:b])) for t, a, b in subs))


# ------------------------------------------------------------------------------ building


def build_v1(source: tuple[str, int] | None = None, destination: tuple[str, int] | None = None,
             family: str | None = None) -> bytes:
    """A version 1 line: ``TCP4`` / ``TCP6`` from the addresses, ``UNKNOWN`` without them."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    if family is None:
        family = "INET6" if ":" in source[0] else "INET"
    proto = "TCP6" if family == "INET6" else "TCP4"
    return f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def _pack_address(family: str, source: Any, destination: Any) -> bytes:
    if family == "UNSPEC" or source is None:
        return b""
    if family in ("INET", "INET6"):
        kind = ipaddress.IPv4Address if family == "INET" else ipaddress.IPv6Address
        return (kind(source[0]).packed + kind(destination[0]).packed
                + struct.pack("!HH", source[1], destination[1]))
    return b"".join(
        os.fsencode(p).ljust(108, b"\x00")
        for p in (source, destination)
    )


def build_v2(command: str = "PROXY", family: str = "INET", protocol: str = "STREAM",
             source: Any = None, destination: Any = None,
             tlvs: tuple[tuple[int, bytes], ...] | list[tuple[int, bytes]] = (),
             crc: bool = False) -> bytes:
    """A version 2 header; with *crc* a CRC32C TLV is appended and filled in."""
    body = _pack_address(family, source, destination)
    body += b"".join(bytes([t]) + struct.pack("!H", len(v)) + v for t, v in tlvs)
    if crc:
        body += bytes([PP2_TYPE_CRC32C]) + b"\x00\x04" + b"\x00" * 4
    head = SIGNATURE + bytes([0x20 | {"LOCAL": 0, "PROXY": 1}[command],
                              _FAMILY_CODE[family] << 4 | _PROTOCOL_CODE[protocol]])
    raw = head + struct.pack("!H", len(body)) + body
    if crc:
        raw = raw[:-4] + crc32c(raw).to_bytes(4, "big")
    return raw
