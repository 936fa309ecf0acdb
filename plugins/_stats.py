"""The ``stats`` plugin: what a server did, counted for every strategy, as metrics.

What belongs here: the plugin's hook implementations (counting into shared memory),
publishing this process's gauges, the prefork supervisor's view of its workers, the
``snapshot()`` and summary line of the plugin's first version, and ``Stats`` instances
that serve ``/metrics`` (``_prometheus``) or push to statsd (``_statsd``). The metric table
and the text format are ``_metrics``.

Opt-in by name (``--plugin stats``, ``compose(..., plugins=[STATS])``), or as an instance
with a side listener: ``Stats(metrics_address=("127.0.0.1", 9100))``.

How the counts stay right across processes (``SharedCounters``): the counters are made at
``sockserve_server_activate``, before any worker is forked; every process adds to its own
row; a dead process's row is reused with its counts kept, so no counter goes backwards and
the memory is fixed. Gauges (connections active, pool threads busy, queue depth) are
values each process sets for itself when they changed, from its serving thread's
``service_actions`` (every loop turn: after each request, at least every poll interval)
and when it scrapes;
only live processes count. The workers-by-state gauge is the supervisor's own bookkeeping
of the prefork hooks. The server's own per-process counters (``requests_timed_out``,
``limits_reached``) are copied in as they grow (``_ServerStats.mirror``).
"""

from __future__ import annotations

import bisect
import collections
import logging
import os
import socket
import threading
import time
import weakref
from typing import Any, Final

from .. import __version__
from ..core import DatagramTruncatedError, SharedCounters, hookimpl, plugin_state
from . import _metrics as m
from ._prometheus import MetricsListener, parse_metrics_address, register_source
from ._statsd import INTERVAL, StatsdEmitter

__all__ = ["BUCKETS", "STATS", "Stats", "stats_from_flags"]

BUCKETS = m.BUCKETS
COUNTERS = ("accepted", "denied", "finished", "failed")

_CELLS = m.counter_cells()
_GAUGES = m.gauge_cells()
ACCEPTED = m.cell("sockserve_connections_accepted_total")
ACTIVE = m.cell("sockserve_connections_active")
BUSY = m.cell("sockserve_pool_threads_busy")
QUEUED = m.cell("sockserve_pool_queue_depth")
TRUNCATED = m.cell("sockserve_datagrams_truncated_total")
_OUTCOME = {o: m.cell("sockserve_requests_total", o) for o in m.REQUEST_OUTCOMES}
_REQUEST = "sockserve_request_duration_seconds"
_TLS = "sockserve_tls_handshake_duration_seconds"
_REQUEST_BUCKETS = tuple(m.bucket_cell(_REQUEST, i) for i in range(len(m.BUCKETS) + 1))
_TLS_BUCKETS = tuple(m.bucket_cell(_TLS, i) for i in range(len(m.TLS_BUCKETS) + 1))
_SOCKET = socket.socket
_TIMEOUTS = "sockserve_requests_timed_out_total"
_LIMITS = "sockserve_limits_reached_total"
#: Seconds between two copies of the server's ``requests_timed_out`` and
#: ``limits_reached`` into the shared counters from service_actions (a loop turn then
#: costs one clock read); a request that timed out is copied at once, and so is
#: everything at serve_stop and at each scrape of this process.
MIRROR_INTERVAL: Final = 0.1
_perf_counter = time.perf_counter
_monotonic = time.monotonic
_bisect = bisect.bisect_left
#: Deny reason -> the cells it adds to, learnt as reasons come (bounded: a third-party
#: layer's reasons are words in its code, and the map is cleared past this many).
_DENIED_CACHE: dict[str, tuple[tuple[str, int], ...]] = {}
_DENIED_CACHE_MAX: Final = 256

#: Forks seen by this process: a process publishes its gauges once in each generation.
_generation = 0


def _denied_cells(reason: str) -> tuple[tuple[str, int], ...]:
    found = _DENIED_CACHE.get(reason)
    if found is None:
        label = m.rejected_reason(reason)
        cells = [(m.cell("sockserve_connections_rejected_total", label), 1)]
        if label == "tls":
            cells.append((m.cell("sockserve_tls_handshake_failures_total", m.tls_failure(reason)), 1))
        elif label == "proxy":
            cells.append((m.cell("sockserve_proxy_header_failures_total", m.proxy_failure(reason)), 1))
        if len(_DENIED_CACHE) >= _DENIED_CACHE_MAX:
            _DENIED_CACHE.clear()
        found = _DENIED_CACHE[reason] = tuple(cells)
    return found


def _layer_cells(request: Any, client_address: Any) -> list[tuple[str, int]]:
    """What the layers did for this connection: a TLS handshake's time, a PROXY header."""
    cells: list[tuple[str, int]] = []
    took = getattr(request, "handshake_time", None) if request.__class__ is not _SOCKET else None
    if took is not None:
        cells.append((_TLS_BUCKETS[bisect.bisect_left(m.TLS_BUCKETS, took)], 1))
        cells.append((f"{_TLS}|sum_ns", int(took * 1e9)))
    if client_address.__class__ is not tuple:
        header = getattr(client_address, "proxy", None)
        series = None if header is None else m.proxy_series(header.version, header.command)
        if series is not None:
            cells.append((m.cell("sockserve_proxy_headers_total", *series), 1))
    return cells


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class _ServerStats:
    """One server's counters, and (in the supervisor) its workers by state."""

    def __init__(self) -> None:
        self.counters = counters = SharedCounters(_CELLS, gauges=_GAUGES)
        # The cells a request adds to, by index: a name lookup per add costs more than
        # the add (bench_metrics.py).
        self.accepted_at = counters.index(ACCEPTED)
        self.outcome_at = {o: counters.index(c) for o, c in _OUTCOME.items()}
        self.bucket_at = tuple(counters.index(c) for c in _REQUEST_BUCKETS)
        self.sum_at = counters.index(f"{_REQUEST}|sum_ns")
        #: id(request) -> perf_counter() at request_start; the request's own key, so no
        #: threading.local (and no stale start time when a start hook did not run).
        self.started: dict[int, float] = {}
        #: id(request) -> what its layers did (TLS, PROXY), for the few that have any.
        self.layers: dict[int, list[tuple[str, int]]] = {}
        #: requests_timed_out / limits_reached values already added: (metric, key) -> n.
        self.mirrored: dict[tuple[str, str], int] = {}
        self.next_mirror = 0.0
        self.mirror_lock = threading.Lock()
        self.mirror_generation = _generation
        self.starting: collections.Counter[int] = collections.Counter()  # slot -> forked
        self.ready: dict[int, int] = {}  # pid -> slot
        self.aborting: dict[int, int] = {}  # pid -> slot
        self.generation = -1  # the fork generation whose gauges this process published
        self.published = (-1, -1, -1)

    def publish(self, server: Any, *, force: bool = True) -> None:
        """Set this process's gauges from *server* (its serving thread, or a scrape);
        without *force*, only when they changed (a loop turn costs three reads then)."""
        queued = getattr(server, "requests_queued", 0)
        now = (len(server.in_flight) + server.waiting + queued, getattr(server, "threads_busy", 0),
               queued)
        if not force and now == self.published and self.generation == _generation:
            return
        counters = self.counters
        counters.set(ACTIVE, now[0])
        counters.set(BUSY, now[1])
        counters.set(QUEUED, now[2])
        self.generation, self.published = _generation, now

    def mirror(self, server: Any) -> None:
        """Add what ``requests_timed_out`` and ``limits_reached`` of *server* (counted by
        this process) gained since the last copy."""
        if self.mirror_generation != _generation:  # a forked child: a lock of its own
            self.mirror_lock, self.mirror_generation = threading.Lock(), _generation
        with self.mirror_lock:
            done = self.mirrored
            cells = []
            for metric, source, values in ((_TIMEOUTS, server.requests_timed_out, m.TIMEOUT_LIMITS),
                                           (_LIMITS, server.limits_reached, m.LIMITS_REACHED)):
                for key, value in list(source.items()):
                    gained = value - done.get((metric, key), 0)
                    if gained > 0:
                        done[(metric, key)] = value
                        cells.append((m.cell(metric, m.limit_label(key, values)), gained))
            if cells:
                self.counters.add_many(cells)
            self.next_mirror = _monotonic() + MIRROR_INTERVAL

    def workers(self) -> dict[tuple[str, ...], int]:
        return {("starting",): sum(self.starting.values()), ("ready",): len(self.ready),
                ("aborting",): len(self.aborting)}

    def worker_exited(self, slot: int) -> None:
        # worker_exit names the slot, not the pid: during a rolling reload a slot has an
        # old and a new worker. The one that exited is the one no longer alive (reaped).
        for table in (self.aborting, self.ready):
            for pid, owner in list(table.items()):
                if owner == slot and not _alive(pid):
                    del table[pid]
                    return
        if self.starting[slot] > 0:
            self.starting[slot] -= 1


class Stats:
    """Count connections and requests by outcome and time them; see the module docstring.

    :param logger: where the summary line goes at close (default ``sockserve.stats``).
    :param metrics_address: serve ``GET /metrics`` (Prometheus text 0.0.4) on this
        ``(host, port)`` or ``"HOST:PORT"``, bound now: a busy address raises here.
    :param statsd_address: also push the metrics to a statsd server there (UDP).
    :param statsd_interval: seconds between statsd flushes.
    :param statsd_prefix: the first part of every statsd key.
    :raises BindError: *metrics_address* cannot be bound; nothing is left open.
    :raises AddressError: an address has none of the accepted shapes.
    """

    sockserve_autoload = False

    def __init__(self, logger: logging.Logger | None = None, *,
                 metrics_address: tuple[str, int] | str | None = None,
                 statsd_address: tuple[str, int] | str | None = None,
                 statsd_interval: float = INTERVAL, statsd_prefix: str = "sockserve") -> None:
        self.logger = logger or logging.getLogger("sockserve.stats")
        self._servers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._listener: MetricsListener | None = None
        self._statsd: StatsdEmitter | None = None
        if isinstance(statsd_address, str):
            statsd_address = parse_metrics_address(statsd_address)
        if statsd_address is not None:
            self._statsd = StatsdEmitter(statsd_address, self.families, interval=statsd_interval,
                                         prefix=statsd_prefix)
        if isinstance(metrics_address, str):
            metrics_address = parse_metrics_address(metrics_address)
        if metrics_address is not None:
            self._listener = MetricsListener(metrics_address, self.render)

    # ------------------------------------------------------------------ reading

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """The bound ``(host, port)`` of the ``/metrics`` listener (the real port when 0
        was asked for); None without one."""
        return None if self._listener is None else self._listener.address

    def _state(self, server: Any) -> _ServerStats:
        # Made at activation, before any child is forked, so that forked children add to it.
        # The per-request hooks call plugin_state themselves: one call fewer each.
        return plugin_state(server, self, _ServerStats)

    def families(self, server: Any = None) -> list[m.Family]:
        """The metric families of *server*, or summed over every server this counts."""
        servers = [server] if server is not None else list(self._servers)
        values: collections.Counter[str] = collections.Counter()
        workers: collections.Counter[tuple[str, ...]] = collections.Counter()
        for one in servers:
            state = self._state(one)
            state.publish(one)  # this process's gauges as of now
            state.mirror(one)
            values.update(state.counters.snapshot())
            workers.update(state.workers())
        return m.families(values, {"sockserve_workers": workers}, __version__)

    def render(self, server: Any = None) -> bytes:
        """The metrics as Prometheus text exposition format 0.0.4 (``m.CONTENT_TYPE``)."""
        return m.render(self.families(server))

    def snapshot(self, server: Any) -> dict[str, Any]:
        """Return the counters and the histogram (bucket upper bound -> count) of *server*:
        ``accepted``, ``denied``, ``finished`` (handler returned), ``failed`` (raised)."""
        values = self._state(server).counters.snapshot()
        denied = sum(values[m.cell("sockserve_connections_rejected_total", r)]
                     for r in m.REJECTED_VALUES)
        histogram = dict(zip((*BUCKETS, float("inf")), (values[c] for c in _REQUEST_BUCKETS)))
        return {"accepted": values[ACCEPTED], "denied": denied, "finished": values[_OUTCOME["ok"]],
                "failed": values[_OUTCOME["error"]] + values[_OUTCOME["timeout"]],
                "durations": histogram}

    def close(self) -> None:
        """Close the ``/metrics`` listener and stop statsd (after a last flush)."""
        if self._listener is not None:
            self._listener.close()
        if self._statsd is not None:
            self._statsd.close()

    # ------------------------------------------------------------------ lifecycle

    @hookimpl
    def sockserve_server_activate(self, server: Any) -> None:
        self._state(server)  # the shared memory, before any child is forked
        self._servers.add(server)
        register_source(server, self)
        if self._listener is not None:
            self._listener.start()
        if self._statsd is not None:
            self._statsd.start()

    @hookimpl
    def sockserve_server_closed(self, server: Any) -> None:
        self._servers.discard(server)
        if not self._servers:
            self.close()
        snap = self.snapshot(server)
        histogram = " ".join(
            f"<={bound * 1000:g}ms:{n}" if bound != float("inf") else f"slower:{n}"
            for bound, n in snap["durations"].items()
        )
        self.logger.info(
            "%s: accepted %d, denied %d, finished %d, failed %d; durations %s",
            type(server).__name__, snap["accepted"], snap["denied"], snap["finished"],
            snap["failed"], histogram,
        )

    @hookimpl
    def sockserve_service_actions(self, server: Any) -> None:
        state = plugin_state(server, self, _ServerStats)
        # Every turn (about 1.5 µs when nothing changed): a throttle would leave a sync
        # worker's gauges stale for the whole of a long request, its loop blocked in it.
        state.publish(server, force=False)
        if _monotonic() >= state.next_mirror:
            state.mirror(server)

    @hookimpl
    def sockserve_serve_stop(self, server: Any) -> None:
        self._state(server).mirror(server)  # a prefork worker's last counts, before it exits

    # ------------------------------------------------------------------ per request
    #
    # Each hook here is a call per request, so a request goes through as few as it can:
    # request_start and request_finish for every one, request_denied for the refused
    # ones. No verify_request: every accepted connection ends in exactly one of
    # request_finish (after request_start) or request_denied (run_request's contract), so
    # counting accepted at request_start and at request_denied gives the same total
    # without a hook wrapper on the serving thread (a wrapper goes through pluggy's
    # machinery, about 4 µs a call; a lone plain implementation is called directly).

    @hookimpl
    def sockserve_request_denied(self, server: Any, request: Any, client_address: Any,
                                 reason: str) -> None:
        cells = _denied_cells(reason)
        if request.__class__ is not _SOCKET or client_address.__class__ is not tuple:
            cells = (*cells, *_layer_cells(request, client_address))
        self._state(server).counters.add_many(((ACCEPTED, 1), *cells))

    @hookimpl
    def sockserve_request_start(self, server: Any, request: Any, client_address: Any) -> None:
        state = plugin_state(server, self, _ServerStats)
        if state.generation != _generation:
            state.publish(server)  # a forked child (forking strategy) that runs no loop
        elif state.published[0] == 0:
            # Published as idle, and this one runs: say so now. A sync worker's loop does
            # not turn (no service_actions) until the request ends, however long it runs;
            # the next turn publishes the exact figures.
            state.counters.set(ACTIVE, 1)
            state.published = (1, *state.published[1:])
        kind = request.__class__
        if (kind is not _SOCKET and kind is not tuple) or client_address.__class__ is not tuple:
            layers = _layer_cells(request, client_address)
            if layers:
                state.layers[id(request)] = layers
        state.counters.add_at(state.accepted_at)
        state.started[id(request)] = _perf_counter()

    @hookimpl
    def sockserve_request_finish(self, server: Any, request: Any, exc: BaseException | None) -> None:
        now = _perf_counter()
        state = plugin_state(server, self, _ServerStats)
        key = id(request)
        took = now - state.started.pop(key, now)
        if exc is None:
            outcome = state.outcome_at["ok"]
        else:
            outcome = state.outcome_at["timeout" if isinstance(exc, TimeoutError) else "error"]
        state.counters.add_many_at(((outcome, 1), (state.bucket_at[_bisect(BUCKETS, took)], 1),
                                    (state.sum_at, int(took * 1e9))))
        if state.layers:
            layers = state.layers.pop(key, None)
            if layers:
                state.counters.add_many(layers)
        if exc is not None:
            state.mirror(server)  # an idle or request timeout is counted before this hook

    @hookimpl
    def sockserve_accept_error(self, server: Any, exc: OSError) -> None:
        if isinstance(exc, DatagramTruncatedError):
            cell = TRUNCATED
        else:
            cell = m.cell("sockserve_accept_errors_total", m.accept_errno(exc.errno))
        self._state(server).counters.add(cell)

    # ------------------------------------------------------------------ prefork supervisor

    @hookimpl
    def sockserve_pre_fork(self, server: Any, worker_id: int) -> None:
        self._state(server).starting[worker_id] += 1

    @hookimpl
    def sockserve_worker_ready(self, server: Any, worker_id: int, pid: int) -> None:
        state = self._state(server)
        if state.starting[worker_id] > 0:
            state.starting[worker_id] -= 1
        state.ready[pid] = worker_id

    @hookimpl
    def sockserve_worker_abort(self, server: Any, worker_id: int, pid: int) -> None:
        state = self._state(server)
        state.ready.pop(pid, None)
        state.aborting[pid] = worker_id

    @hookimpl
    def sockserve_worker_exit(self, server: Any, worker_id: int, reason: str) -> None:
        state = self._state(server)
        state.worker_exited(worker_id)
        restart = m.restart_reason(reason)
        if restart is not None:
            state.counters.add(m.cell("sockserve_worker_restarts_total", restart))


def stats_from_flags(metrics: str | None, statsd: str | None = None) -> Stats | None:
    """The ``Stats`` plugin ``sockserve serve --metrics HOST:PORT [--statsd HOST:PORT]``
    asks for, its ``/metrics`` listener bound now; None when neither flag is given.

    :raises AddressError: a value has none of the shapes ``HOST:PORT``, ``[IPV6]:PORT``,
        ``PORT``.
    :raises BindError: the metrics address is busy (or cannot be bound); nothing is left
        open.
    """
    if metrics is None and statsd is None:
        return None
    return Stats(metrics_address=metrics, statsd_address=statsd)


def _after_fork_in_child() -> None:
    global _generation
    _generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

#: The instance the ``stats`` entry point names.
STATS = Stats()
