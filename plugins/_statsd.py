"""The ``stats`` plugin's statsd emitter: the same metrics, pushed over UDP.

One daemon thread in the process that made the server (the prefork supervisor, the
forking strategy's parent) reads the shared memory every ``interval`` seconds and sends
what changed: counters as ``|c`` deltas since the last flush, gauges as ``|g`` values,
and each histogram as its count and sum deltas (``.count``, ``.sum_ms``) plus one timing
(``|ms``) of the interval's mean with a sample rate of 1/count, so that a statsd server's
count and mean of the timer come out right (its percentiles are of those means). The
request path sends nothing: no per-request syscall.

A receiver that is down costs the server nothing: the socket is non-blocking and never
connected, so a send fails at most locally (a full buffer, no route), is dropped, and is
logged once, when the first flush fails, and once more when sending works again.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Final

from ._metrics import Family

__all__ = ["StatsdEmitter", "statsd_lines"]

log = logging.getLogger("sockserve.stats")

#: Seconds between flushes: statsd servers aggregate over 10 s by default.
INTERVAL: Final = 10.0
#: Bytes of lines per datagram: fits an Ethernet MTU with IP and UDP headers, as the
#: statsd documentation advises (larger datagrams fragment or are dropped).
MAX_DATAGRAM: Final = 1432

_emitters: weakref.WeakSet[StatsdEmitter] = weakref.WeakSet()


def _key(prefix: str, name: str, labels: tuple[tuple[str, str], ...]) -> str:
    short = name[len("sockserve_"):] if name.startswith("sockserve_") else name
    if short.endswith("_total"):
        short = short[:-len("_total")]
    parts = [prefix, short, *(value.replace(".", "_").replace(":", "_") for _, value in labels)]
    return ".".join(p for p in parts if p)


def statsd_lines(found: list[Family], last: dict[str, float], prefix: str) -> list[str]:
    """The statsd lines for *found*, counters as deltas from *last* (updated in place)."""
    lines = []
    for family in found:
        metric = family.metric
        if metric.name == "sockserve_build_info":
            continue
        if metric.kind == "histogram":
            count = next(v for s, _, v in family.samples if s == "_count")
            total = next(v for s, _, v in family.samples if s == "_sum")
            key = _key(prefix, metric.name, ())
            dcount = count - last.get(key + ".count", 0)
            dsum = total - last.get(key + ".sum", 0.0)
            last[key + ".count"], last[key + ".sum"] = count, total
            if dcount > 0:
                lines.append(f"{key}.count:{int(dcount)}|c")
                lines.append(f"{key}.sum_ms:{dsum * 1000:.3f}|c")
                lines.append(f"{key}:{dsum * 1000 / dcount:.3f}|ms|@{1 / dcount:.6g}")
            continue
        for _, labels, value in family.samples:
            key = _key(prefix, metric.name, labels)
            if metric.kind == "gauge":
                lines.append(f"{key}:{value:g}|g")
                continue
            delta = value - last.get(key, 0)
            last[key] = value
            if delta > 0:
                lines.append(f"{key}:{int(delta)}|c")
    return lines


class StatsdEmitter:
    """Send ``families()`` to a statsd server at *address* every *interval* seconds.

    :param address: the statsd server, ``(host, port)``.
    :param families: what gives the current metric families.
    :param interval: seconds between flushes.
    :param prefix: the first part of every key (``sockserve.requests.ok``).
    """

    def __init__(self, address: tuple[str, int], families: Callable[[], list[Family]], *,
                 interval: float = INTERVAL, prefix: str = "sockserve") -> None:
        if not (isinstance(interval, (int, float)) and math.isfinite(interval) and interval > 0):
            raise ValueError(f"statsd interval must be seconds > 0 (got {interval!r})")
        self.address = address
        self.interval = float(interval)
        self.prefix = prefix
        self._families = families
        self._last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._sock: socket.socket | None = None
        #: Datagrams sent and dropped so far (for tests and the curious).
        self.sent = self.dropped = 0
        _emitters.add(self)

    def start(self) -> None:
        """Start the flushing thread (once)."""
        if self._thread is not None or self._stop.is_set():
            return
        self._thread = threading.Thread(target=self._run, name="sockserve-statsd", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Flush once more, then stop the thread."""
        if self._stop.is_set():
            return
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.interval + 5)
        self.flush()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        _emitters.discard(self)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception:  # never end the thread; families() failing is a bug, logged
                log.exception("statsd: flush failed")

    def flush(self) -> None:
        """Send what changed since the last flush now."""
        lines = statsd_lines(self._families(), self._last, self.prefix)
        if not lines:
            return
        if self._sock is None:
            try:
                info = socket.getaddrinfo(self.address[0], self.address[1], type=socket.SOCK_DGRAM)
                self._sock = socket.socket(info[0][0], socket.SOCK_DGRAM)
                self._sock.setblocking(False)
                self._target = info[0][4]
            except OSError as exc:
                self._failed(exc, len(lines))
                return
        failure = None
        for packet in _packets(lines):
            try:
                self._sock.sendto(packet, self._target)
                self.sent += 1
            except OSError as exc:  # a full buffer, no route, a refusal reported late
                self.dropped += 1
                failure = exc
        if failure is not None:
            self._failed(failure, 0)
        elif self._failing:
            self._failing = False
            log.info("statsd: sending to %s:%s again", *self.address)

    def _failed(self, exc: OSError, lines: int) -> None:
        self.dropped += 1 if lines else 0
        if not self._failing:
            self._failing = True
            log.warning("statsd: cannot send to %s:%s (%s); metrics are dropped until it works, "
                        "not logged again", self.address[0], self.address[1], exc)

    def _forget_in_child(self) -> None:
        # A new Event, set: the parent's may have been waited on by its thread at the fork.
        self._stop = threading.Event()
        self._stop.set()
        self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _packets(lines: list[str]) -> list[bytes]:
    packets, current = [], b""
    for line in lines:
        data = line.encode()
        if current and len(current) + 1 + len(data) > MAX_DATAGRAM:
            packets.append(current)
            current = b""
        current = data if not current else current + b"\n" + data
    if current:
        packets.append(current)
    return packets


def _after_fork_in_child() -> None:
    for emitter in list(_emitters):
        emitter._forget_in_child()
    _emitters.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
