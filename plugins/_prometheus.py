"""The Prometheus side of the ``stats`` plugin: the ``/metrics`` side listener, the
``--metrics HOST:PORT`` parser, and a collector for a user's own ``prometheus_client``.

The side listener is a plain TCP socket bound when it is made (a busy address is an error
there and then, before any serving) and served by one daemon thread of its own in the
process that made it, never by the serving thread: a scrape costs the server's loop
nothing but the GIL for the millisecond it takes to render. A forked child (a prefork
worker, a forking strategy's child) closes its copies of the listener and of a scrape in
progress at once (``os.register_at_fork``), so only the process that made the server
answers, and nothing stays open because a child holds it.

The HTTP it speaks is the least a scraper needs: one request per connection, ``GET`` (or
``HEAD``) ``/metrics``, a reply with ``Content-Length`` and ``Connection: close``; 404 for
another path, 405 for another method. A client gets ``REQUEST_TIMEOUT`` seconds to send
its request head and at most ``MAX_REQUEST`` bytes of it.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Final

from ..core import AddressError, BindError, PortRangeError
from ._metrics import CONTENT_TYPE, Family

__all__ = ["Collector", "MetricsListener", "parse_metrics_address", "register_source"]

log = logging.getLogger("sockserve.stats")

#: Seconds a scraper has to send its request head: Prometheus sends it at once; a
#: stalled client must not hold the (single) listener thread for long.
REQUEST_TIMEOUT: Final = 2.0
#: Bytes of request head read at most (a scrape's is ~200).
MAX_REQUEST: Final = 8192
#: listen() backlog of the side listener: scrapers are few.
BACKLOG: Final = 16
METRICS_SHAPES: Final = "HOST:PORT, [IPV6]:PORT or PORT (127.0.0.1)"

#: The listeners of this process, told about forks.
_listeners: weakref.WeakSet[MetricsListener] = weakref.WeakSet()
#: server -> the plugin counting it, which has ``families(server)`` (the stats plugin
#: registers each server it counts; the value does not refer to the server).
_sources: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def register_source(server: Any, stats: Any) -> None:
    """Make ``Collector(server)`` collect ``stats.families(server)`` (the stats plugin
    calls this for each server it counts)."""
    _sources[server] = stats


def parse_metrics_address(text: str) -> tuple[str, int]:
    """Parse ``--metrics``'s value: ``HOST:PORT``, ``[IPV6]:PORT`` or ``PORT`` (loopback).

    :raises AddressError: another shape; ``PortRangeError`` for a port outside 0-65535.
    """
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", text
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host or not host:
        raise AddressError(text, "metrics", METRICS_SHAPES,
                           "an IPv6 host goes in brackets" if host else "no host")
    if not port_text.isdigit():
        raise AddressError(text, "metrics", METRICS_SHAPES, f"port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise PortRangeError(text, "metrics", METRICS_SHAPES, f"port {port} is not in 0-65535")
    return host, port


class MetricsListener:
    """Serve ``render()`` as ``GET /metrics`` on a side listener bound at *address*.

    Bound and listening when made; the thread starts with ``start()``. ``close()`` (any
    thread, more than once) stops the thread and closes every socket.

    :raises BindError: the address cannot be bound (busy, not local, no permission);
        nothing is left open.
    """

    def __init__(self, address: tuple[str, int], render: Callable[[], bytes]) -> None:
        self._render = render
        infos = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            raise BindError.from_os_error(
                exc, f"{exc.strerror or exc}: cannot bind the metrics address {address[0]}:"
                f"{address[1]}", address) from exc
        self._sock: socket.socket | None = sock
        self._wake_r, self._wake_w = socket.socketpair()
        self._conn: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        #: The bound address (host, port): the real port when 0 was asked for.
        self.address: tuple[str, int] = sock.getsockname()[:2]
        _listeners.add(self)

    @property
    def closed(self) -> bool:
        """``close()`` was called (or this is a forked child's copy)."""
        return self._sock is None

    def start(self) -> None:
        """Start answering scrapes (once; later calls do nothing)."""
        with self._lock:
            if self._thread is not None or self._sock is None:
                return
            self._thread = threading.Thread(target=self._serve, name="sockserve-metrics",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread and close the side listener."""
        with self._lock:
            sock, self._sock = self._sock, None
            thread = self._thread
        if sock is None:
            return
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if thread is not None and thread is not threading.current_thread():
            thread.join(REQUEST_TIMEOUT + 1)
        sock.close()
        self._wake_r.close()
        self._wake_w.close()
        _listeners.discard(self)

    def _serve(self) -> None:
        sock = self._sock
        if sock is None:
            return
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while self._sock is not None:
                ready = [key.fileobj for key, _ in selector.select()]
                if self._wake_r in ready or self._sock is None:
                    return
                try:
                    conn, _ = sock.accept()
                except OSError:
                    continue
                self._conn = conn
                try:
                    self._answer(conn)
                except Exception:  # a scrape must never end the thread
                    log.exception("metrics: a scrape failed")
                finally:
                    self._conn = None
                    conn.close()

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(REQUEST_TIMEOUT)
        head = b""
        try:
            while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) < MAX_REQUEST:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                head += chunk
        except OSError:
            return
        parts = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
        method, path = (parts[0], parts[1]) if len(parts) >= 2 else (b"", b"")
        if method not in (b"GET", b"HEAD"):
            status, body, kind = "405 Method Not Allowed", b"GET /metrics only\n", "text/plain"
        elif path.split(b"?", 1)[0] != b"/metrics":
            status, body, kind = "404 Not Found", b"metrics are at /metrics\n", "text/plain"
        else:
            status, body, kind = "200 OK", self._render(), CONTENT_TYPE
        reply = (f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                 "Connection: close\r\n\r\n").encode()
        try:
            conn.sendall(reply if method == b"HEAD" else reply + body)
        except OSError:
            pass

    def _forget_in_child(self) -> None:
        # The child's copies only: the parent's listener stays open and served. No lock
        # taken: another thread of the parent may have held it at the fork.
        self._lock = threading.Lock()
        for sock in (self._sock, self._conn, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._sock = self._conn = None
        self._thread = None


def _after_fork_in_child() -> None:
    for listener in list(_listeners):
        listener._forget_in_child()
    _listeners.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _weakrefable(obj: Any) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


class Collector:
    """A ``prometheus_client`` collector of the ``stats`` plugin's metrics.

    ::

        from prometheus_client import REGISTRY
        REGISTRY.register(Collector(server))      # or Collector(stats) for all its servers

    ``prometheus_client`` is imported when the collector collects, not before; sockserve
    does not depend on it. The values are those ``/metrics`` shows, read from the shared
    memory each time (prefork: every worker's, read in the supervisor).

    :param source: a server the ``stats`` plugin counts, or a ``Stats`` instance.
    """

    def __init__(self, source: Any, families: Callable[[], list[Family]] | None = None) -> None:
        if families is None:
            stats = _sources.get(source) if _weakrefable(source) else None
            if stats is not None:
                server = source

                def families() -> list[Family]:
                    return stats.families(server)
            elif callable(getattr(source, "families", None)):
                families = source.families
            else:
                raise TypeError(f"Collector needs a server the stats plugin counts (activated) "
                                f"or a Stats instance, not {source!r}")
        self._families: Callable[[], list[Family]] = families

    def collect(self) -> Iterator[Any]:
        """Yield the metric families (``prometheus_client`` calls this per scrape)."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        for family in self._families():
            metric = family.metric
            if metric.kind == "histogram":
                buckets = [(dict(labels)["le"], value) for suffix, labels, value in family.samples
                           if suffix == "_bucket"]
                total = next(v for s, _, v in family.samples if s == "_sum")
                yield HistogramMetricFamily(metric.name, metric.help, buckets=buckets,
                                            sum_value=total)
                continue
            kind = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
            out = kind(metric.name, metric.help, labels=list(metric.labels))
            for _, labels, value in family.samples:
                out.add_metric([v for _, v in labels], value)
            yield out
