"""The ``proxy`` layer: the PROXY protocol (v1 and v2) in front of any stream transport.

``compose("tcp", "threadpool", layers=["proxy"])`` (or ``layers=[ProxyLayer]``) serves
connections relayed by HAProxy ``send-proxy`` / ``send-proxy-v2``, by an AWS NLB, by
stunnel... The header is parsed by ``_proxy_header.parse`` to the letter of HAProxy's
``proxy-protocol.txt``; this module reads it off the connection and decides.

Charter (it may pass 400 lines): the layer itself, its options, the allow-list, reading
the header off the connection within its deadline, the addresses the handler sees, and
the refusals with their log throttle. Parsing belongs to ``_proxy_header``.

- On the serving thread, ``verify_request`` checks the peer against ``allow`` (CIDRs,
  default loopback) before anything is read: a peer outside is refused with
  ``proxy-not-allowed``. A Unix-socket peer has no IP address and is allowed: whoever may
  connect to the socket file is trusted (set its permissions accordingly).
- In the worker, ``prepare_request`` reads the header within ``header_timeout`` seconds,
  one deadline over the whole header however it is fragmented, never reading a byte past
  it: it peeks (``MSG_PEEK``), parses, and consumes only bytes that belong to the header,
  so the handler (or the ``tls`` layer after this one) starts at the first payload byte.
- The handler's ``client_address`` is the original client's, a ``ProxiedAddress`` (a
  tuple: ``client_address[0]`` is the host as usual) or for a Unix source a
  ``ProxiedPath`` (a str), whose ``.proxy`` is the ``ProxyHeader`` (TLVs: ``alpn``,
  ``authority``, ``unique_id``, ``ssl``). For LOCAL (health checks), v1 ``UNKNOWN`` and
  an UNSPEC family it is the real peer's address, ``.proxy`` set all the same. Addresses
  have the socket module's shapes and spelling (``inet_ntop``): ``(host, port)`` for
  IPv4, ``(host, port, 0, 0)`` for IPv6, a path for a Unix source. Both pickle.
- A version 2 header may be at most ``max_header_length`` bytes (default 4096: any
  HAProxy header with every TLV option fits; the protocol allows 65551).
- Refusals raise ``LayerError`` with reason ``proxy-not-allowed``, ``proxy-timeout``,
  ``proxy-header`` (not a valid header, or the connection ended inside one),
  ``proxy-version`` (a version not in ``versions``) or ``proxy-eof`` (closed or reset
  before sending a single byte: a proxy's connect-only health check; logged at DEBUG
  only). Every refusal is counted in ``server.requests_denied``; the layer logs it itself,
  at most once per peer address per minute.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import socket
import threading
import time
from typing import Any

import attrs
import sockserve

from ._proxy_header import V1_MAX, V2_FIXED, V2_MAX, NeedMore, ProxyHeader, ProxyHeaderError, parse

__all__ = [
    "DEFAULT_ALLOW",
    "ProxiedAddress",
    "ProxiedPath",
    "ProxyLayer",
    "ProxyOptions",
    "parse_allow",
]

log = logging.getLogger("sockserve")

#: The proxies allowed by default: loopback.
DEFAULT_ALLOW = "127.0.0.0/8,::1/128"
#: A peer's refusals are logged at most once per this many seconds.
LOG_INTERVAL = 60.0
#: How many peers the log throttle remembers at most.
LOG_PEERS = 1024
#: The first peek: the spec's smallest TCP segment (576 - 40); a header fits in it.
FIRST_PEEK = 536

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# ------------------------------------------------------------------------------ addresses


class ProxiedAddress(tuple):
    """A client address (a tuple, as the socket module gives) and the header it came in.

    ``client_address[0]`` and ``client_address[1]`` are the host and port as without
    the layer; ``client_address.proxy`` is the ``ProxyHeader``. It pickles.
    """

    proxy: ProxyHeader

    def __new__(cls, address: tuple[Any, ...], proxy: ProxyHeader) -> ProxiedAddress:
        self = super().__new__(cls, address)
        self.proxy = proxy
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (tuple(self), self.proxy))


class ProxiedPath(str):
    """A Unix-socket client address (a str) and the header it came in (``.proxy``)."""

    proxy: ProxyHeader

    def __new__(cls, address: str, proxy: ProxyHeader) -> ProxiedPath:
        self = super().__new__(cls, address)
        self.proxy = proxy
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.proxy))


def _proxied(address: Any, header: ProxyHeader) -> Any:
    if isinstance(address, tuple):
        proxied = tuple.__new__(ProxiedAddress, address)  # as ProxiedAddress(), less a call
        proxied.proxy = header
        return proxied
    if isinstance(address, bytes):  # an abstract Unix peer, as the socket module gives it
        address = os.fsdecode(address)
    return ProxiedPath(address, header)


# ------------------------------------------------------------------------------ options


@functools.lru_cache(maxsize=64)
def _parse_allow(value: str | tuple[str, ...]) -> tuple[Network, ...]:
    items = value.split(",") if isinstance(value, str) else value
    networks = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"a CIDR is a str, not {item!r}")
        cidr = item.strip()
        if not cidr and isinstance(value, str):
            continue
        try:
            networks.append(ipaddress.ip_network(cidr))
        except ValueError as exc:
            raise ValueError(f"bad CIDR {cidr!r} in allow: {exc}") from None
    return tuple(networks)


def parse_allow(value: str | list[str] | tuple[str, ...]) -> tuple[Network, ...]:
    """The networks of an ``allow`` value: ``"10.0.0.0/8,::1"`` or a list of CIDRs.

    :raises ValueError: naming the first entry that is not a CIDR (host bits set count:
        ``10.0.0.1/8`` is refused, write ``10.0.0.0/8``).
    """
    return _parse_allow(value if isinstance(value, str) else tuple(value))


@attrs.frozen
class _AllowList:
    def __call__(self, instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, (str, list, tuple)):
            raise TypeError(f"'{attribute.name}' must be CIDRs, comma-separated or a list (got {value!r})")
        parse_allow(value)


@attrs.frozen
class _HeaderLength:
    def __call__(self, instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not V2_FIXED <= value <= V2_MAX:
            raise ValueError(f"'{attribute.name}' must be an int from {V2_FIXED} to {V2_MAX} (got {value!r})")


@attrs.define
class ProxyOptions:
    """Options of the ``proxy`` layer."""

    #: The PROXY protocol versions accepted: ``"1,2"`` (both), ``"1"`` or ``"2"``.
    versions: str = sockserve.choice("1,2", "1", "2", default="1,2")
    #: The proxies allowed to connect (CIDRs, comma-separated or a list); other peers
    #: are closed unread. Unix-socket peers are always allowed.
    allow: str | tuple[str, ...] = sockserve.option(_AllowList(), default=DEFAULT_ALLOW)
    #: Seconds a connection has to send its complete header.
    header_timeout: float = sockserve.seconds(optional=False, default=5.0)
    #: The longest version 2 header accepted, in bytes (the 16-byte fixed part, the
    #: addresses and the TLVs); the protocol allows up to 65551.
    max_header_length: int = sockserve.option(_HeaderLength(), default=4096)


# ------------------------------------------------------------------------------ the log throttle


class _Throttle:
    """At most one log line per peer per ``LOG_INTERVAL``; remembers ``LOG_PEERS`` peers."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last: dict[Any, tuple[float, int]] = {}  # peer -> (logged at, suppressed since)
        self.pid = os.getpid()

    def admit(self, peer: Any) -> int | None:
        """None: do not log; else log, saying how many were suppressed before."""
        now = time.monotonic()
        with self.lock:
            seen = self.last.get(peer)
            if seen is not None and now - seen[0] < LOG_INTERVAL:
                self.last[peer] = (seen[0], seen[1] + 1)
                return None
            self.last.pop(peer, None)
            if len(self.last) >= LOG_PEERS:
                for old in [p for p, (t, _) in self.last.items() if now - t >= LOG_INTERVAL]:
                    del self.last[old]
                while len(self.last) >= LOG_PEERS:
                    del self.last[next(iter(self.last))]
            self.last[peer] = (now, 0)
            return 0 if seen is None else seen[1]


_throttles_lock = threading.Lock()


def _reset_lock() -> None:
    global _throttles_lock
    _throttles_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock)


def _host(client_address: Any) -> str | None:
    if isinstance(client_address, tuple) and client_address and isinstance(client_address[0], str):
        return client_address[0]
    return None


def _allowed(host: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    candidates: list[Any] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            candidates = [ipaddress.IPv6Address(host.split("%", 1)[0])]
        if ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
    return any(c in net for c in candidates for net in networks if c.version == net.version)


@functools.lru_cache(maxsize=1024)
def _allowed_cached(host: str, allow: str | tuple[str, ...]) -> bool:
    """``_allowed`` remembered per (host, allow): a server sees few proxies, and parsing
    an address costs more than the rest of the check."""
    return _allowed(host, _parse_allow(allow))


# ------------------------------------------------------------------------------ the layer


@sockserve.declare_options(ProxyOptions)
class ProxyLayer:
    """Read a PROXY protocol header (v1 or v2) first; the client is the one it names.

    ``compose("tcp", "threadpool", layers=["proxy"], options={"allow": "10.0.0.0/8"})``.
    See the module's documentation for what the handler sees and how refusals go.
    """

    versions: str
    allow: str | tuple[str, ...]
    header_timeout: float
    max_header_length: int

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refuse a peer outside ``allow`` (``proxy-not-allowed``) before reading."""
        if not super().verify_request(request, client_address):  # type: ignore[misc]
            return False
        if isinstance(request, tuple):
            return True
        host = _host(client_address)
        if host is None:
            return True  # a Unix-socket peer: no IP to check
        allow = self.allow
        if isinstance(allow, str):
            # Per server, the verdicts by host for this allow value: one dict lookup on
            # the serving thread (the only thread that calls this).
            known: tuple[str, dict[str, bool]] | None = self.__dict__.get("_proxy_allowed")
            if known is None or known[0] is not allow:
                known = self.__dict__["_proxy_allowed"] = (allow, {})
            verdicts = known[1]
            allowed = verdicts.get(host)
            if allowed is None:
                allowed = _allowed_cached(host, allow)
                if len(verdicts) >= LOG_PEERS:
                    verdicts.clear()
                verdicts[host] = allowed
        else:
            allowed = _allowed_cached(host, tuple(allow))
        if not allowed:
            raise self._proxy_refusal("proxy-not-allowed", client_address,
                                      f"{host} is not in allow={self.allow!r}")
        return True

    def prepare_request(self, request: Any, client_address: Any) -> tuple[Any, Any]:
        """Read the header; return the connection and the client it names."""
        request, client_address = super().prepare_request(request, client_address)  # type: ignore[misc]
        if isinstance(request, tuple):
            return request, client_address
        header = self._proxy_read(request, client_address)
        source = header.source
        if header.command != "PROXY" or source is None:  # not header.proxied: the peer
            source = client_address
        if type(source) is tuple:  # the usual case, as _proxied() does it, less a call
            proxied = tuple.__new__(ProxiedAddress, source)
            proxied.proxy = header
            return request, proxied
        return request, _proxied(source, header)

    # -------------------------------------------------------------- reading

    def _proxy_read(self, sock: socket.socket, peer: Any) -> ProxyHeader:
        versions = _versions(self.versions)
        max_length = self.max_header_length
        if _CAN_PEEK_NOW and sock.gettimeout() is None:  # (with a timeout, recv would wait first)
            # The usual case: the whole header is there already (the proxy sends it at
            # once): one peek without waiting, one read of exactly the header.
            try:
                chunk: bytes | None = sock.recv(FIRST_PEEK, _PEEK_NOW)
            except BlockingIOError:
                chunk = None
            except (ConnectionResetError, BrokenPipeError):
                raise self._proxy_ended(peer, b"", "reset") from None
            if chunk == b"":
                raise self._proxy_ended(peer, b"", "closed")
            if chunk is not None:
                try:
                    result = parse(chunk, versions, max_length)
                except ProxyHeaderError as exc:
                    raise self._proxy_refusal(f"proxy-{exc.reason}", peer, str(exc)) from None
                if type(result) is ProxyHeader:
                    size = len(result.raw)
                    got = len(sock.recv(size))  # peeked: all there, read at once
                    if got != size:
                        _consume(sock, size - got)
                    return result
        return self._proxy_read_slowly(sock, peer, versions, max_length)

    def _proxy_read_slowly(self, sock: socket.socket, peer: Any, versions: frozenset[int],
                           max_length: int) -> ProxyHeader:
        """The header in pieces: peek, consume what belongs to it, wait for more, all
        within one deadline."""
        timeout = self.header_timeout
        deadline = time.monotonic() + timeout
        previous = sock.gettimeout()
        buf = b""
        want = FIRST_PEEK
        exact = False
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(want) if exact else sock.recv(want, socket.MSG_PEEK)
                if not chunk:
                    raise self._proxy_ended(peer, buf, "closed")
                data = buf + chunk
                result = parse(data, versions, max_length)
                if isinstance(result, NeedMore):
                    if not exact:
                        _consume(sock, len(chunk))
                    buf = data
                    exact = result.exact
                    want = result.at_most if exact else min(result.at_most, V1_MAX)
                    continue
                if not exact:
                    _consume(sock, len(result.raw) - len(buf))
                return result
        except ProxyHeaderError as exc:
            raise self._proxy_refusal(f"proxy-{exc.reason}", peer, str(exc)) from None
        except TimeoutError:
            raise self._proxy_refusal(
                "proxy-timeout", peer, f"no complete header within {timeout}s ({len(buf)} bytes)"
            ) from None
        except (ConnectionResetError, BrokenPipeError):
            raise self._proxy_ended(peer, buf, "reset") from None
        finally:
            try:
                sock.settimeout(previous)
            except OSError:
                pass

    def _proxy_ended(self, peer: Any, buf: bytes, how: str) -> sockserve.LayerError:
        if not buf:  # a connect-only health check: nothing to warn about
            log.debug("%s: %s %s before sending anything", type(self).__name__, peer, how)
            return sockserve.LayerError("proxy-eof", peer, f"{how} before sending anything", log=False)
        return self._proxy_refusal("proxy-header", peer, f"{how} after {len(buf)} bytes of a header")

    def _proxy_refusal(self, reason: str, peer: Any, detail: str) -> sockserve.LayerError:
        """The LayerError for a refusal, logged here at most once per peer per minute."""
        throttle = self._proxy_throttle()
        key = _host(peer) or peer
        suppressed = throttle.admit(key)
        if suppressed is not None:
            more = f" ({suppressed} more refused since, not logged)" if suppressed else ""
            log.warning("%s: refused %s: %s: %s%s; further refusals of %s are logged at most "
                        "once a minute", type(self).__name__, peer, reason, detail, more, key)
        return sockserve.LayerError(reason, peer, detail, log=False)

    def _proxy_throttle(self) -> _Throttle:
        throttle = self.__dict__.get("_proxy_log_throttle")
        if throttle is None or throttle.pid != os.getpid():
            with _throttles_lock:
                throttle = self.__dict__.get("_proxy_log_throttle")
                if throttle is None or throttle.pid != os.getpid():
                    throttle = _Throttle()
                    self.__dict__["_proxy_log_throttle"] = throttle
        return throttle


#: recv flags peeking without waiting (0 where MSG_DONTWAIT is missing: always wait), as a
#: plain int: socket's flags are IntFlag members, whose operators run Python code.
_PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT) if hasattr(socket, "MSG_DONTWAIT") else 0
_CAN_PEEK_NOW = _PEEK_NOW != 0


@functools.lru_cache(maxsize=8)
def _versions(text: str) -> frozenset[int]:
    return frozenset(int(v) for v in text.split(","))


def _consume(sock: socket.socket, n: int) -> None:
    """Read *n* bytes already peeked at (they are in the socket's buffer)."""
    while n > 0:
        got = sock.recv(n)
        if not got:
            raise ConnectionResetError("the connection ended inside peeked bytes")
        n -= len(got)
