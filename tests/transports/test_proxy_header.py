"""The PROXY protocol parser (transports/_proxy_header.py), against HAProxy's
``proxy-protocol.txt``: a table of valid and invalid headers (each row a reason from the
specification), every valid header cut at every byte, and generated headers (hypothesis:
``PROXY_FUZZ_EXAMPLES`` examples, 10,000 by default; the run of 100,000 is marked
``slow``: ``python -m pytest -m slow tests/transports/test_proxy_header.py``).

More than 400 lines: the specification's table of headers is most of it, and belongs in
one place with the generators that cover what the table does not.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import proxy_support as ps  # noqa: E402

from sockserve.transports import _proxy_header as ph  # noqa: E402
from sockserve.transports._proxy_header import (  # noqa: E402
    NeedMore,
    ProxyHeader,
    ProxyHeaderError,
    parse,
)

EXAMPLES = int(os.environ.get("PROXY_FUZZ_EXAMPLES", "10000"))
SLOW_EXAMPLES = 100_000
#: The slow run (100,000 examples) runs when this is set (a ``slow`` marker once registered).
FUZZ = dict(deadline=None, database=None, derandomize=False,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SSL_TLV = ps.tlv(0x20, b"\x07" + b"\x00\x00\x00\x00" + ps.tlv(0x21, b"TLSv1.3") + ps.tlv(0x22, b"client.example")
                 + ps.tlv(0x23, b"TLS_AES_128_GCM_SHA256") + ps.tlv(0x24, b"ECDSA-SHA256")
                 + ps.tlv(0x25, b"EC256"))

# (id, header bytes, expected: version, command, family, protocol, source, destination)
VALID = [
    ("v1-tcp4", b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
     (1, "PROXY", "INET", "STREAM", ("192.168.0.1", 56324), ("192.168.0.11", 443))),
    ("v1-tcp4-max", b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
     (1, "PROXY", "INET", "STREAM", ("255.255.255.255", 65535), ("255.255.255.255", 65535))),
    ("v1-tcp4-zeros", b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n",
     (1, "PROXY", "INET", "STREAM", ("0.0.0.0", 0), ("0.0.0.0", 0))),
    ("v1-tcp6", b"PROXY TCP6 2001:db8::1 ::1 1234 80\r\n",
     (1, "PROXY", "INET6", "STREAM", ("2001:db8::1", 1234, 0, 0), ("::1", 80, 0, 0))),
    ("v1-tcp6-upper-full", b"PROXY TCP6 FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF:FFFF "
     b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
     (1, "PROXY", "INET6", "STREAM", ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535, 0, 0),
      ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535, 0, 0))),
    ("v1-unknown-short", b"PROXY UNKNOWN\r\n", (1, "PROXY", "UNSPEC", "UNSPEC", None, None)),
    ("v1-unknown-long-ignored",
     b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
     (1, "PROXY", "UNSPEC", "UNSPEC", None, None)),
    ("v1-unknown-107-bytes", b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n", (1, "PROXY", "UNSPEC", "UNSPEC", None, None)),
    ("v1-unknown-garbage-ignored", b"PROXY UNKNOWN whatever\x00\xff goes\r\n",
     (1, "PROXY", "UNSPEC", "UNSPEC", None, None)),
    ("v2-local-empty", ps.v2(0x20, 0x00, b""), (2, "LOCAL", "UNSPEC", "UNSPEC", None, None)),
    ("v2-local-with-address-skipped", ps.v2(0x20, 0x11, ps.inet4("10.0.0.1", "10.0.0.2", 1, 2)),
     (2, "LOCAL", "INET", "STREAM", ("10.0.0.1", 1), ("10.0.0.2", 2))),
    ("v2-proxy-unspec", ps.v2(0x21, 0x00, b""), (2, "PROXY", "UNSPEC", "UNSPEC", None, None)),
    ("v2-tcp4", ps.v2(0x21, 0x11, ps.inet4("203.0.113.7", "127.0.0.1", 5555, 80)),
     (2, "PROXY", "INET", "STREAM", ("203.0.113.7", 5555), ("127.0.0.1", 80))),
    ("v2-udp4", ps.v2(0x21, 0x12, ps.inet4("203.0.113.7", "127.0.0.1", 53, 53)),
     (2, "PROXY", "INET", "DGRAM", ("203.0.113.7", 53), ("127.0.0.1", 53))),
    ("v2-tcp6", ps.v2(0x21, 0x21, ps.inet6("2001:db8::7", "::1", 5555, 443)),
     (2, "PROXY", "INET6", "STREAM", ("2001:db8::7", 5555, 0, 0), ("::1", 443, 0, 0))),
    ("v2-udp6", ps.v2(0x21, 0x22, ps.inet6("::", "::", 0, 0)),
     (2, "PROXY", "INET6", "DGRAM", ("::", 0, 0, 0), ("::", 0, 0, 0))),
    ("v2-unix-stream", ps.v2(0x21, 0x31, ps.unix(b"/run/client.sock", b"/run/haproxy.sock")),
     (2, "PROXY", "UNIX", "STREAM", "/run/client.sock", "/run/haproxy.sock")),
    ("v2-unix-dgram-abstract-unnamed", ps.v2(0x21, 0x32, ps.unix(b"\x00abstract", b"")),
     (2, "PROXY", "UNIX", "DGRAM", "\x00abstract", "")),
    ("v2-tlvs", ps.v2(0x21, 0x11, ps.inet4("1.2.3.4", "5.6.7.8", 1, 2) + ps.tlv(0x01, b"h2")
                      + ps.tlv(0x02, b"example.com") + ps.tlv(0x04, b"") + ps.tlv(0x05, b"u" * 128)
                      + SSL_TLV + ps.tlv(0x30, b"ns1") + ps.tlv(0xE0, b"custom")),
     (2, "PROXY", "INET", "STREAM", ("1.2.3.4", 1), ("5.6.7.8", 2))),
    ("v2-crc32c", ps.v2(0x21, 0x11, ps.inet4("1.2.3.4", "5.6.7.8", 1, 2) + ps.tlv(0x01, b"h2"), crc=True),
     (2, "PROXY", "INET", "STREAM", ("1.2.3.4", 1), ("5.6.7.8", 2))),
    ("v2-noop-padding-only", ps.v2(0x21, 0x11, ps.inet4("1.2.3.4", "5.6.7.8", 1, 2) + ps.tlv(0x04, b"\0" * 9)),
     (2, "PROXY", "INET", "STREAM", ("1.2.3.4", 1), ("5.6.7.8", 2))),
    ("v2-local-tlvs-unspec", ps.v2(0x20, 0x00, ps.tlv(0x05, b"id")), (2, "LOCAL", "UNSPEC", "UNSPEC", None, None)),
]

_GOOD4 = ps.inet4("1.2.3.4", "5.6.7.8", 1, 2)
# (id: why it is invalid, bytes, the reason ProxyHeaderError gives)
INVALID = [
    ("not-proxy-http", b"GET / HTTP/1.1\r\n\r\n", "header"),
    ("not-proxy-tls", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "header"),
    ("v1-lowercase-proxy", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "header"),
    ("v1-no-space-after-proxy", b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "header"),
    ("v1-two-spaces", b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "header"),
    ("v1-two-spaces-between-addresses", b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "header"),
    ("v1-tab", b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", "header"),
    ("v1-trailing-space", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "header"),
    ("v1-unknown-protocol-udp4", b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "header"),
    ("v1-tcp5", b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "header"),
    ("v1-unknownx", b"PROXY UNKNOWNX\r\n", "header"),
    ("v1-unknown-lowercase", b"PROXY unknown\r\n", "header"),
    ("v1-missing-port", b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "header"),
    ("v1-extra-field", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "header"),
    ("v1-only-proto", b"PROXY TCP4\r\n", "header"),
    ("v1-lf-only", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "header"),
    ("v1-cr-only", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "header"),
    ("v1-lf-cr", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n\r", "header"),
    ("v1-unknown-lone-lf-inside", b"PROXY UNKNOWN a\nb\r\n", "header"),
    ("v1-unknown-lone-cr-inside", b"PROXY UNKNOWN a\rb\r\n", "header"),
    ("v1-port-plus", b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 443\r\n", "header"),
    ("v1-port-underscore", b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 443\r\n", "header"),
    ("v1-port-leading-zero", b"PROXY TCP4 1.2.3.4 5.6.7.8 080 443\r\n", "header"),
    ("v1-port-00", b"PROXY TCP4 1.2.3.4 5.6.7.8 00 443\r\n", "header"),
    ("v1-port-too-big", b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 443\r\n", "header"),
    ("v1-port-six-digits", b"PROXY TCP4 1.2.3.4 5.6.7.8 100000 443\r\n", "header"),
    ("v1-port-negative", b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 443\r\n", "header"),
    ("v1-port-unicode-digit", "PROXY TCP4 1.2.3.4 5.6.7.8 ١ 443\r\n".encode(), "header"),
    ("v1-port-hex", b"PROXY TCP4 1.2.3.4 5.6.7.8 0x50 443\r\n", "header"),
    ("v1-ipv4-leading-zero", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "header"),
    ("v1-ipv4-octet-256", b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n", "header"),
    ("v1-ipv4-three-parts", b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "header"),
    ("v1-ipv4-five-parts", b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", "header"),
    ("v1-ipv4-empty-part", b"PROXY TCP4 1..3.4 5.6.7.8 1 2\r\n", "header"),
    ("v1-ipv4-hostname", b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", "header"),
    ("v1-ipv6-in-tcp4", b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "header"),
    ("v1-ipv4-in-tcp6", b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "header"),
    ("v1-ipv4-mapped-dotted-in-tcp6", b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n", "header"),
    ("v1-ipv6-zone", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "header"),
    ("v1-ipv6-two-double-colons", b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "header"),
    ("v1-ipv6-five-digit-group", b"PROXY TCP6 12345::1 ::1 1 2\r\n", "header"),
    ("v1-ipv6-nine-groups", b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "header"),
    ("v1-ipv6-brackets", b"PROXY TCP6 [::1] ::1 1 2\r\n", "header"),
    ("v1-crlf-ends-at-108", b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "header"),
    ("v1-crlf-ends-at-109", b"PROXY UNKNOWN " + b"x" * 93 + b"\r\n", "header"),
    ("v1-nul-in-tcp4", b"PROXY TCP4 1.2.3.4\x005.6.7.8 1 2\r\n", "header"),
    ("v1-disabled", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "version"),
    ("v2-disabled", ps.v2(0x21, 0x11, _GOOD4), "version"),
    ("v2-bad-signature", b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + _GOOD4, "header"),
    ("v2-version-1", ps.v2(0x11, 0x11, _GOOD4), "version"),
    ("v2-version-3", ps.v2(0x31, 0x11, _GOOD4), "version"),
    ("v2-command-2", ps.v2(0x22, 0x11, _GOOD4), "header"),
    ("v2-command-f", ps.v2(0x2F, 0x11, _GOOD4), "header"),
    ("v2-family-4", ps.v2(0x21, 0x41, _GOOD4), "header"),
    ("v2-protocol-3", ps.v2(0x21, 0x13, _GOOD4), "header"),
    ("v2-inet-unspec-protocol-not-listed", ps.v2(0x21, 0x10, _GOOD4), "header"),
    ("v2-unspec-stream-not-listed", ps.v2(0x21, 0x01, b""), "header"),
    ("v2-inet-too-short", ps.v2(0x21, 0x11, _GOOD4[:11]), "header"),
    ("v2-inet6-too-short", ps.v2(0x21, 0x21, _GOOD4 * 2), "header"),
    ("v2-unix-too-short", ps.v2(0x21, 0x31, b"\0" * 215), "header"),
    ("v2-local-inet-too-short", ps.v2(0x20, 0x11, b""), "header"),
    ("v2-too-long-for-limit", ps.v2(0x21, 0x11, _GOOD4 + ps.tlv(0xE0, b"x" * 5000)), "header"),
    ("v2-truncated-tlv-header", ps.v2(0x21, 0x11, _GOOD4 + b"\x01\x00"), "header"),
    ("v2-tlv-overrun", ps.v2(0x21, 0x11, _GOOD4 + b"\x01\x00\x05ab"), "header"),
    ("v2-crc-mismatch", ps.v2(0x21, 0x11, _GOOD4 + ps.tlv(0x03, b"\0\0\0\1")), "header"),
    ("v2-crc-short", ps.v2(0x21, 0x11, _GOOD4 + ps.tlv(0x03, b"\0\0\0")), "header"),
    ("v2-crc-twice", ps.v2(0x21, 0x11, _GOOD4 + ps.tlv(0x03, b"\0" * 4) + ps.tlv(0x03, b"\0" * 4)), "header"),
    ("v2-alpn-twice", ps.v2(0x21, 0x11, _GOOD4 + ps.tlv(0x01, b"h2") + ps.tlv(0x01, b"h2")), "header"),
    ("v2-unique-id-129", ps.v2(0x21, 0x11, _GOOD4 + ps.tlv(0x05, b"u" * 129)), "header"),
    ("v2-ssl-too-short", ps.v2(0x21, 0x11, _GOOD4 + ps.tlv(0x20, b"\x01\0\0\0")), "header"),
    ("v2-ssl-truncated-sub-tlv", ps.v2(0x21, 0x11, _GOOD4 + ps.tlv(0x20, b"\x01\0\0\0\0\x21\x00")), "header"),
    ("v2-ssl-sub-tlv-overrun", ps.v2(0x21, 0x11, _GOOD4 + ps.tlv(0x20, b"\x01\0\0\0\0\x21\x00\x09TLS")), "header"),
]

V1_DISABLED = frozenset({2})
V2_DISABLED = frozenset({1})


def _versions(case_id: str) -> frozenset[int]:
    return V1_DISABLED if case_id == "v1-disabled" else V2_DISABLED if case_id == "v2-disabled" else frozenset({1, 2})


@pytest.mark.parametrize(("raw", "expected"), [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_header_parses_and_leaves_the_payload(raw: bytes, expected: tuple) -> None:
    payload = b"GET / HTTP/1.0\r\n\r\n\x00\r\n"
    header = parse(raw + payload)
    assert isinstance(header, ProxyHeader)
    assert header.raw == raw
    got = (header.version, header.command, header.family, header.protocol, header.source,
           header.destination)
    assert got == expected


@pytest.mark.parametrize("raw", [c[1] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_header_cut_at_every_byte_needs_more_then_parses(raw: bytes) -> None:
    for cut in range(len(raw)):
        result = parse(raw[:cut])
        assert isinstance(result, NeedMore), (cut, result)
        # The promise a reader relies on: the rest of the header fits in at_most.
        assert len(raw) - cut <= result.at_most, (cut, result)
        if result.exact:
            assert len(raw) - cut == result.at_most
        # Fed the rest in a second piece, the same header, nothing past it.
        whole = parse(raw[:cut] + raw[cut:] + b"PAYLOAD")
        assert isinstance(whole, ProxyHeader) and whole.raw == raw


@pytest.mark.parametrize(("raw", "reason"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_header_is_refused_with_its_reason(raw: bytes, reason: str) -> None:
    case_id = next(c[0] for c in INVALID if c[1] == raw)
    versions = _versions(case_id)
    max_length = 4096
    with pytest.raises(ProxyHeaderError) as caught:
        parse(raw + b"\r\n" * 60, versions, max_length)
    assert caught.value.reason == reason, caught.value
    # Fed byte by byte, it is refused at some point and never taken for a header.
    for cut in range(len(raw) + 1):
        try:
            result = parse(raw[:cut], versions, max_length)
        except ProxyHeaderError:
            break
        assert isinstance(result, NeedMore), (cut, result)


def test_invalid_v1_is_refused_before_the_crlf_when_it_can_be() -> None:
    """Garbage is refused at once, not after waiting for a CRLF that may never come."""
    for prefix in (b"G", b"PROXY X", b"PROXY TCP4 1.2.3.4/", b"PROXY TCP6 ::1 .", b"\r\n\r\n\x01"):
        with pytest.raises(ProxyHeaderError):
            parse(prefix)


def test_tlv_properties() -> None:
    raw = dict((c[0], c[1]) for c in VALID)["v2-tlvs"]
    header = parse(raw)
    assert isinstance(header, ProxyHeader)
    assert header.alpn == b"h2"
    assert header.authority == "example.com"
    assert header.unique_id == b"u" * 128
    assert header.netns == "ns1"
    assert header.tlv(0xE0) == b"custom"
    assert [t for t, _ in header.tlvs] == [0x01, 0x02, 0x04, 0x05, 0x20, 0x30, 0xE0]
    ssl = header.ssl
    assert ssl is not None
    assert (ssl.client, ssl.verify, ssl.ssl, ssl.cert_conn, ssl.cert_sess) == (7, 0, True, True, True)
    assert (ssl.version, ssl.cn, ssl.cipher, ssl.sig_alg, ssl.key_alg) == (
        "TLSv1.3", "client.example", "TLS_AES_128_GCM_SHA256", "ECDSA-SHA256", "EC256")
    assert header.proxied


def test_crc32c_matches_rfc_and_a_bitwise_implementation() -> None:
    assert ph.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert ph.crc32c(b"\x00" * 32) == 0x8A9136AA  # RFC 3720 B.4 test vectors
    assert ph.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert ph.crc32c(bytes(range(32))) == 0x46DD794E
    for data in (b"", b"a", bytes(range(256)) * 3):
        assert ph.crc32c(data) == ps.crc32c_bitwise(data)
    raw = dict((c[0], c[1]) for c in VALID)["v2-crc32c"]
    header = parse(raw)
    assert isinstance(header, ProxyHeader) and header.crc32c == int.from_bytes(raw[-4:], "big")


def test_length_limit_is_configurable_to_the_spec_maximum() -> None:
    raw = ps.v2(0x21, 0x11, _GOOD4 + ps.tlv(0xE0, b"x" * 65000))
    assert isinstance(parse(raw, max_length=ph.V2_MAX), ProxyHeader)
    with pytest.raises(ProxyHeaderError):
        parse(raw, max_length=4096)


def test_builders_agree_with_the_test_encoder() -> None:
    assert ph.build_v2("PROXY", "INET", "STREAM", ("1.2.3.4", 1), ("5.6.7.8", 2),
                       [(1, b"h2")], crc=True) == ps.v2(0x21, 0x11, _GOOD4 + ps.tlv(1, b"h2"), crc=True)
    assert ph.build_v2("LOCAL", "UNSPEC", "UNSPEC") == ps.v2(0x20, 0x00, b"")
    assert ph.build_v1(("1.2.3.4", 1), ("5.6.7.8", 2)) == b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    assert ph.build_v1() == b"PROXY UNKNOWN\r\n"


# ------------------------------------------------------------------------------ generated headers

_ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
def _text6(n: int) -> str:
    """IPv6 address *n* in hexadecimal groups only (the v1 grammar has no dotted form)."""
    address = ipaddress.IPv6Address(n)
    return address.compressed if "." not in address.compressed else address.exploded


def _canon6(text: str) -> str:
    """What the parser reports: the address as the socket module shows a peer's."""
    return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text))


_ipv6 = st.one_of(st.integers(0, 2**128 - 1), st.integers(0, 2**16 - 1),
                  st.integers(0, 2**16 - 1).map(lambda n: n << 112),
                  st.integers(0, 2**32 - 1).map(lambda n: 0xFFFF << 32 | n)).map(_text6)
_port = st.integers(0, 65535)


@st.composite
def v1_headers(draw: st.DrawFn) -> tuple[bytes, tuple]:
    kind = draw(st.sampled_from(["TCP4", "TCP6", "UNKNOWN"]))
    if kind == "UNKNOWN":
        rest = draw(st.binary(max_size=91)).replace(b"\r", b"r").replace(b"\n", b"n")
        line = b"PROXY UNKNOWN" + (b" " + rest if draw(st.booleans()) else b"") + b"\r\n"
        return line, (1, "PROXY", "UNSPEC", "UNSPEC", None, None, ())
    addr = _ipv4 if kind == "TCP4" else _ipv6
    s, d, sp, dp = draw(addr), draw(addr), draw(_port), draw(_port)
    if kind == "TCP6" and draw(st.booleans()):
        s_text = ":".join(f"{g:04X}" for g in _groups(s))  # upper case, no compression
    else:
        s_text = s
    line = f"PROXY {kind} {s_text} {d} {sp} {dp}\r\n".encode()
    if kind == "TCP4":
        return line, (1, "PROXY", "INET", "STREAM", (s, sp), (d, dp), ())
    return line, (1, "PROXY", "INET6", "STREAM", (_canon6(s), sp, 0, 0), (_canon6(d), dp, 0, 0), ())


def _groups(address: str) -> list[int]:
    packed = ipaddress.IPv6Address(address).packed
    return [int.from_bytes(packed[i:i + 2], "big") for i in range(0, 16, 2)]


_tlv_types = st.sampled_from([0x01, 0x02, 0x04, 0x05, 0x20, 0x30, 0xE0, 0xE5, 0xF0, 0xF8, 0x99])


@st.composite
def _tlv_list(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    seen: set[int] = set()
    for kind in draw(st.lists(_tlv_types, max_size=6)):
        if kind in ph._SINGLE and kind in seen:
            continue
        seen.add(kind)
        if kind == 0x05:
            value = draw(st.binary(max_size=128))
        elif kind == 0x20:
            subs = draw(st.lists(st.tuples(st.sampled_from([0x21, 0x22, 0x23, 0x24, 0x25, 0x77]),
                                           st.binary(max_size=40)), max_size=4))
            value = bytes([draw(st.integers(0, 255))]) + draw(st.binary(min_size=4, max_size=4))
            value += b"".join(ps.tlv(t, v) for t, v in subs)
        else:
            value = draw(st.binary(max_size=200))
        out.append((kind, value))
    return out


@st.composite
def v2_headers(draw: st.DrawFn) -> tuple[bytes, tuple]:
    command = draw(st.sampled_from([0x0, 0x1]))
    fam = draw(st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32]))
    family = ph.FAMILIES[fam >> 4]
    protocol = ph.PROTOCOLS[fam & 0xF]
    if fam >> 4 == 1:
        s, d, sp, dp = draw(_ipv4), draw(_ipv4), draw(_port), draw(_port)
        body, src, dst = ps.inet4(s, d, sp, dp), (s, sp), (d, dp)
    elif fam >> 4 == 2:
        s, d, sp, dp = draw(_ipv6), draw(_ipv6), draw(_port), draw(_port)
        body, src, dst = ps.inet6(s, d, sp, dp), (_canon6(s), sp, 0, 0), (_canon6(d), dp, 0, 0)
    elif fam >> 4 == 3:
        path = st.binary(min_size=1, max_size=107).map(lambda b: b.replace(b"\0", b"0"))
        s_b, d_b = draw(path), draw(path)
        body, src, dst = ps.unix(s_b, d_b), os.fsdecode(s_b), os.fsdecode(d_b)
    else:
        body, src, dst = b"", None, None
    tlvs = draw(_tlv_list())
    body += b"".join(ps.tlv(t, v) for t, v in tlvs)
    crc = draw(st.booleans())
    raw = ps.v2(0x20 | command, fam, body, crc=crc)
    if crc:
        tlvs = [*tlvs, (0x03, raw[-4:])]
    cmd = "LOCAL" if command == 0 else "PROXY"
    return raw, (2, cmd, family, protocol, src, dst, tuple(tlvs))


def _fields(header: ProxyHeader) -> tuple:
    return (header.version, header.command, header.family, header.protocol, header.source,
            header.destination, header.tlvs)


def random_header(rng: random.Random) -> tuple[bytes, tuple]:
    """A valid header and its fields, built from *rng*: the quick generator (one draw per
    example), so that 10,000 examples take seconds; ``v1_headers`` / ``v2_headers`` are the
    structured ones that shrink well."""
    if rng.random() < 0.35:
        kind = rng.choice(["TCP4", "TCP6", "UNKNOWN"])
        if kind == "UNKNOWN":
            rest = rng.randbytes(rng.randrange(92)).replace(b"\r", b"r").replace(b"\n", b"n")
            line = b"PROXY UNKNOWN" + (b" " + rest if rng.random() < 0.7 else b"") + b"\r\n"
            return line, (1, "PROXY", "UNSPEC", "UNSPEC", None, None, ())
        sp, dp = rng.randrange(65536), rng.randrange(65536)
        if kind == "TCP4":
            s, d = (str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in "sd")
            line = f"PROXY TCP4 {s} {d} {sp} {dp}\r\n".encode()
            return line, (1, "PROXY", "INET", "STREAM", (s, sp), (d, dp), ())
        s, d = (_text6(rng.getrandbits(rng.choice([8, 16, 64, 128])) << rng.choice([0, 64])
                       & (2**128 - 1)) for _ in "sd")
        s_text = ":".join(f"{g:04X}" for g in _groups(s)) if rng.random() < 0.3 else s
        line = f"PROXY TCP6 {s_text} {d} {sp} {dp}\r\n".encode()
        return line, (1, "PROXY", "INET6", "STREAM", (_canon6(s), sp, 0, 0), (_canon6(d), dp, 0, 0), ())
    command = rng.choice([0, 1])
    fam = rng.choice([0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32])
    if fam >> 4 in (1, 2):
        bits = 32 if fam >> 4 == 1 else 128
        kind = ipaddress.IPv4Address if bits == 32 else ipaddress.IPv6Address
        s, d = (str(kind(rng.getrandbits(bits))) for _ in "sd")
        sp, dp = rng.randrange(65536), rng.randrange(65536)
        body = (ps.inet4 if bits == 32 else ps.inet6)(s, d, sp, dp)
        src: Any = (s, sp) if bits == 32 else (_canon6(s), sp, 0, 0)
        dst: Any = (d, dp) if bits == 32 else (_canon6(d), dp, 0, 0)
    elif fam >> 4 == 3:
        s_b, d_b = (rng.randbytes(rng.randrange(1, 108)).replace(b"\0", b"0") for _ in "sd")
        body, src, dst = ps.unix(s_b, d_b), os.fsdecode(s_b), os.fsdecode(d_b)
    else:
        body, src, dst = b"", None, None
    tlvs: list[tuple[int, bytes]] = []
    for kind in rng.sample([0x01, 0x02, 0x04, 0x05, 0x20, 0x30, 0xE0, 0xF0, 0x99], rng.randrange(5)):
        if kind == 0x20:
            value = bytes([rng.randrange(256)]) + rng.randbytes(4) + b"".join(
                ps.tlv(rng.choice([0x21, 0x22, 0x23, 0x24, 0x25, 0x77]), rng.randbytes(rng.randrange(40)))
                for _ in range(rng.randrange(4)))
        else:
            value = rng.randbytes(rng.randrange(129 if kind == 0x05 else 64))
        tlvs.append((kind, value))
    body += b"".join(ps.tlv(t, v) for t, v in tlvs)
    crc = rng.random() < 0.3
    raw = ps.v2(0x20 | command, fam, body, crc=crc)
    if crc:
        tlvs.append((0x03, raw[-4:]))
    return raw, (2, "LOCAL" if command == 0 else "PROXY", ph.FAMILIES[fam >> 4],
                 ph.PROTOCOLS[fam & 0xF], src, dst, tuple(tlvs))


_seeds = st.integers(0, 2**64 - 1)


def _seeded_round_trip(seed: int) -> None:
    rng = random.Random(seed)
    case = random_header(rng)
    _round_trip(case, rng.randbytes(rng.randrange(64)), rng.randrange(10_000))


@settings(max_examples=EXAMPLES, **FUZZ)
@given(seed=_seeds)
def test_generated_headers_round_trip_exactly(seed: int) -> None:
    """``random_header(random.Random(seed))``: a header, a payload after it, a cut."""
    _seeded_round_trip(seed)


@settings(max_examples=max(EXAMPLES // 20, 50), **FUZZ)
@given(case=st.one_of(v1_headers(), v2_headers()), payload=st.binary(max_size=64),
       cut=st.integers(0, 10_000))
def test_structured_headers_round_trip_exactly(case: tuple[bytes, tuple], payload: bytes, cut: int) -> None:
    _round_trip(case, payload, cut)


def _round_trip(case: tuple[bytes, tuple], payload: bytes, cut: int) -> None:
    raw, expected = case
    header = parse(raw + payload, max_length=ph.V2_MAX)
    assert isinstance(header, ProxyHeader)
    assert header.raw == raw
    assert _fields(header) == expected
    if header.ssl is not None:  # the SSL TLV's sub-TLVs walk
        assert header.ssl.tlvs is not None
    cut %= len(raw)
    assert isinstance(parse(raw[:cut], max_length=ph.V2_MAX), NeedMore)


def _check_arbitrary(data: bytes) -> None:
    for versions in (frozenset({1, 2}), frozenset({1}), frozenset({2})):
        try:
            result = parse(data, versions)
        except ProxyHeaderError as exc:
            assert exc.reason in ("header", "version")
            continue
        if isinstance(result, ProxyHeader):
            assert data.startswith(result.raw)  # never past the header
            assert len(result.raw) <= (ph.V1_MAX if result.version == 1 else 4096)
        else:
            assert isinstance(result, NeedMore) and result.at_most > 0


_prefixes = st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN",
                             ps.SIG, ps.SIG + b"\x21", ps.SIG + b"\x21\x11\x00\x0c"])


@settings(max_examples=max(EXAMPLES // 10, 100), **FUZZ)
@given(prefix=_prefixes, data=st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_or_over_read(prefix: bytes, data: bytes) -> None:
    _check_arbitrary(prefix + data)


@settings(max_examples=max(EXAMPLES // 10, 100), **FUZZ)
@given(seed=_seeds)
def test_mutated_headers_never_crash_or_over_read(seed: int) -> None:
    """A generated header with one to four bytes changed (or cut short, or extended)."""
    rng = random.Random(seed)
    raw = bytearray(random_header(rng)[0])
    for _ in range(rng.randrange(1, 5)):
        raw[rng.randrange(len(raw))] = rng.randrange(256)
    if rng.random() < 0.2:
        del raw[rng.randrange(len(raw)):]
    _check_arbitrary(bytes(raw) + b"PAYLOAD")


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES, **FUZZ)
@given(seed=_seeds)
def test_generated_headers_round_trip_slow(seed: int) -> None:
    _seeded_round_trip(seed)
