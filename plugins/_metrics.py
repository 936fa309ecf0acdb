"""The ``stats`` plugin's metrics as a table, and their Prometheus text exposition.

What belongs here: one row per metric (name, type, help, labels and their fixed values,
histogram buckets), the tables that map what the server reports (a denial's reason, an
accept error's errno, a TLS failure, a worker's exit reason) onto those fixed label
values, the names of the shared-memory cells each series is kept in, and turning a
snapshot of those cells into metric families and into text format version 0.0.4. What
does not: counting (``_stats``), serving the text (``_prometheus``), statsd (``_statsd``).

Labels are bounded by construction: every label value is in the table, never a client
address or anything else a client chooses; what is not in a table is ``other``.
"""

from __future__ import annotations

import errno
import math
import platform
from collections.abc import Iterable, Mapping
from typing import Final

import attrs

__all__ = [
    "ACCEPT_ERRNOS",
    "BUCKETS",
    "CONTENT_TYPE",
    "Family",
    "METRICS",
    "Metric",
    "TLS_BUCKETS",
    "accept_errno",
    "cell",
    "counter_cells",
    "gauge_cells",
    "limit_label",
    "families",
    "proxy_series",
    "rejected_reason",
    "render",
    "restart_reason",
    "tls_failure",
]

#: The Content-Type of text exposition format 0.0.4.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: Request duration buckets, seconds: decades from 100 µs to 10 s (a socket server's
#: requests span that range; the summary line shows one bucket per decade).
BUCKETS: Final = (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0)
#: TLS handshake buckets, seconds: a loopback handshake takes ~1-3 ms, a distant client's
#: a few round trips (50-300 ms); past handshake_timeout (10 s) none completes.
TLS_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

#: Why a connection accepted was refused before its handler ran, from the reason of
#: ``sockserve_request_denied``. Layer reasons go by prefix (``tls-*``, ``proxy-*``).
REJECTED: Final[Mapping[str, str]] = {
    "verify_request": "verify",      # verify_request or a plugin said no
    "request_prepared": "verify",    # a plugin said no after the layers
    "per-ip": "per-ip",              # max_connections_per_ip
    "first-byte": "first-byte",      # first_byte_timeout passed
    "timeout": "limit",              # a layer's read passed idle_timeout
    "closing": "closing",            # queued or waiting when the server closed
    "process_request": "error",      # the strategy failed to take it
    "prepare_request": "error",      # a layer raised something else than LayerError
    "connection": "error",           # the peer went away inside a layer
}
REJECTED_VALUES: Final = ("verify", "limit", "per-ip", "first-byte", "tls", "proxy",
                          "closing", "error", "other")
#: The accept() errors named in the errno label (resource exhaustion the server backs
#: off from, and the aborted connections it ignores); any other is "other".
ACCEPT_ERRNOS: Final = ("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM", "ECONNABORTED", "ECONNRESET",
                        "EPROTO", "EPERM", "ETIMEDOUT", "EINTR")
_ERRNO_NAMES: Final = {getattr(errno, name): name for name in ACCEPT_ERRNOS if hasattr(errno, name)}
#: The tls layer's failure reasons (``tls-<reason>``).
TLS_FAILURES: Final = ("timeout", "http", "version", "eof", "certificate", "alpn", "handshake",
                       "other")
#: The proxy layer's refusal reasons (``proxy-<reason>``).
PROXY_FAILURES: Final = ("not-allowed", "timeout", "header", "version", "eof", "other")
#: The PROXY headers a layer can accept: (version, command).
PROXY_SERIES: Final = (("1", "PROXY"), ("2", "PROXY"), ("2", "LOCAL"))
#: sockserve_worker_exit's reasons that are restarts ("stop" is not).
RESTARTS: Final = ("max_requests", "timeout", "crash", "reload", "scale", "other")
REQUEST_OUTCOMES: Final = ("ok", "error", "timeout")
#: The keys of a server's ``requests_timed_out`` (idle_timeout, request_timeout).
TIMEOUT_LIMITS: Final = ("idle", "request", "other")
#: The keys of a server's ``limits_reached`` (max_connections paused accepting; every
#: pool thread was busy and a request waited).
LIMITS_REACHED: Final = ("max_connections", "threads", "other")
WORKER_STATES: Final = ("starting", "ready", "aborting")


@attrs.frozen
class Metric:
    """One metric: its exposition name, type, help text and fixed label values."""

    name: str
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    labels: tuple[str, ...] = ()
    #: The label values of each series, in order; ``((),)``: one series without labels.
    series: tuple[tuple[str, ...], ...] = ((),)
    #: A histogram's upper bounds (+Inf added).
    buckets: tuple[float, ...] = ()
    #: Where the value comes from: "shared" (the shared cells), "local" (the process
    #: serving the scrape: supervisor state, build info).
    source: str = "shared"


def _one(label: str, values: Iterable[str]) -> dict[str, object]:
    return {"labels": (label,), "series": tuple((v,) for v in values)}


#: Every metric, in exposition order (docs/operations.md lists the same).
METRICS: Final = (
    Metric("sockserve_connections_accepted_total", "counter",
           "Connections accepted (counted when the handler starts or the connection is "
           "refused)."),
    Metric("sockserve_connections_active", "gauge",
           "Connections held now: waiting for their first byte, queued or running."),
    Metric("sockserve_connections_rejected_total", "counter",
           "Connections accepted and refused before their handler ran, by reason.",
           **_one("reason", REJECTED_VALUES)),  # type: ignore[arg-type]
    Metric("sockserve_accept_errors_total", "counter", "Failed accept() calls, by errno.",
           **_one("errno", (*ACCEPT_ERRNOS, "other"))),  # type: ignore[arg-type]
    Metric("sockserve_requests_total", "counter",
           "Requests handled, by outcome (error: the handler raised; timeout: idle_timeout).",
           **_one("outcome", REQUEST_OUTCOMES)),  # type: ignore[arg-type]
    Metric("sockserve_requests_timed_out_total", "counter",
           "Requests ended by a limit: idle (idle_timeout), request (request_timeout).",
           **_one("limit", TIMEOUT_LIMITS)),  # type: ignore[arg-type]
    Metric("sockserve_limits_reached_total", "counter",
           "Times a limit was reached: max_connections (accepting paused), threads (a "
           "request waited for a pool thread).",
           **_one("limit", LIMITS_REACHED)),  # type: ignore[arg-type]
    Metric("sockserve_request_duration_seconds", "histogram",
           "Time handlers took, from request start to finish.", buckets=BUCKETS),
    Metric("sockserve_tls_handshake_duration_seconds", "histogram",
           "Time completed TLS handshakes took (tls layer).", buckets=TLS_BUCKETS),
    Metric("sockserve_tls_handshake_failures_total", "counter",
           "TLS handshakes that failed, by reason (tls layer).",
           **_one("reason", TLS_FAILURES)),  # type: ignore[arg-type]
    Metric("sockserve_proxy_headers_total", "counter",
           "PROXY protocol headers accepted, by version and command (proxy layer).",
           labels=("version", "command"), series=PROXY_SERIES),
    Metric("sockserve_proxy_header_failures_total", "counter",
           "Connections the proxy layer refused, by reason.",
           **_one("reason", PROXY_FAILURES)),  # type: ignore[arg-type]
    Metric("sockserve_datagrams_truncated_total", "counter",
           "Datagrams dropped as longer than max_packet_size."),
    Metric("sockserve_pool_threads_busy", "gauge",
           "Pool threads running a request (threadpool; summed over prefork workers)."),
    Metric("sockserve_pool_queue_depth", "gauge",
           "Requests waiting for a pool thread (threadpool; summed over prefork workers)."),
    Metric("sockserve_workers", "gauge", "Worker processes by state (prefork supervisor).",
           source="local", **_one("state", WORKER_STATES)),  # type: ignore[arg-type]
    Metric("sockserve_worker_restarts_total", "counter",
           "Worker processes that exited and were replaced, by reason (prefork).",
           **_one("reason", RESTARTS)),  # type: ignore[arg-type]
    Metric("sockserve_build_info", "gauge", "sockserve and Python versions (always 1).",
           labels=("version", "python"), source="local"),
)
_BY_NAME: Final = {metric.name: metric for metric in METRICS}


# --------------------------------------------------------------------------- label tables


def rejected_reason(reason: str) -> str:
    """The ``reason`` label of ``sockserve_connections_rejected_total`` for a denial."""
    found = REJECTED.get(reason)
    if found is not None:
        return found
    if reason.startswith("tls-"):
        return "tls"
    if reason.startswith("proxy-"):
        return "proxy"
    return "other"


def tls_failure(reason: str) -> str:
    """The ``reason`` label of a ``tls-*`` denial."""
    short = reason[4:]
    return short if short in TLS_FAILURES else "other"


def proxy_failure(reason: str) -> str:
    """The ``reason`` label of a ``proxy-*`` denial."""
    short = reason[6:]
    return short if short in PROXY_FAILURES else "other"


def accept_errno(code: int | None) -> str:
    """The ``errno`` label of a failed accept()."""
    return _ERRNO_NAMES.get(code, "other") if code is not None else "other"


def restart_reason(reason: str) -> str | None:
    """The ``reason`` label of a worker exit; None for ``stop`` (not a restart)."""
    if reason == "stop":
        return None
    return reason if reason in RESTARTS else "other"


def limit_label(key: str, values: tuple[str, ...]) -> str:
    """The ``limit`` label of a ``requests_timed_out`` or ``limits_reached`` key."""
    return key if key in values else "other"


def proxy_series(version: int, command: str) -> tuple[str, str] | None:
    key = (str(version), command)
    return key if key in PROXY_SERIES else None


# --------------------------------------------------------------------------- cells


def cell(name: str, *values: str) -> str:
    """The shared-memory cell of a series: ``name`` or ``name|v1,v2``."""
    return f"{name}|{','.join(values)}" if values else name


def bucket_cell(name: str, index: int) -> str:
    """A histogram's cell for bucket *index* (not cumulative; the last one is +Inf)."""
    return f"{name}|b{index}"


def counter_cells() -> tuple[str, ...]:
    """Every counter cell, histograms included (their ``|sum_ns`` in nanoseconds)."""
    cells: list[str] = []
    for metric in METRICS:
        if metric.source != "shared" or metric.kind == "gauge":
            continue
        if metric.kind == "histogram":
            cells += [bucket_cell(metric.name, i) for i in range(len(metric.buckets) + 1)]
            cells.append(f"{metric.name}|sum_ns")
        else:
            cells += [cell(metric.name, *values) for values in metric.series]
    return tuple(cells)


def gauge_cells() -> tuple[str, ...]:
    """Every gauge cell kept per process (live processes only)."""
    return tuple(cell(m.name, *v) for m in METRICS if m.source == "shared" and m.kind == "gauge"
                 for v in m.series)


# --------------------------------------------------------------------------- families


@attrs.frozen
class Family:
    """A metric with its values: ``samples`` are (suffix, labels, value)."""

    metric: Metric
    samples: tuple[tuple[str, tuple[tuple[str, str], ...], float], ...]


def families(values: Mapping[str, int], local: Mapping[str, Mapping[tuple[str, ...], int]],
             version: str) -> list[Family]:
    """The metric families from a snapshot of the cells (*values*) and of the scraping
    process's own values (*local*: metric name -> label values -> value)."""
    found = []
    for metric in METRICS:
        if metric.kind == "histogram":
            found.append(_histogram(metric, values))
            continue
        if metric.name == "sockserve_build_info":
            labels = (("version", version), ("python", platform.python_version()))
            found.append(Family(metric, (("", labels, 1),)))
            continue
        mine = local.get(metric.name, {})
        samples = []
        for series in metric.series:
            value = mine.get(series, 0) if metric.source == "local" else values.get(
                cell(metric.name, *series), 0)
            samples.append(("", tuple(zip(metric.labels, series)), value))
        found.append(Family(metric, tuple(samples)))
    return found


def _histogram(metric: Metric, values: Mapping[str, int]) -> Family:
    samples: list[tuple[str, tuple[tuple[str, str], ...], float]] = []
    running = 0
    for i, bound in enumerate((*metric.buckets, math.inf)):
        running += values.get(bucket_cell(metric.name, i), 0)
        samples.append(("_bucket", (("le", _le(bound)),), running))
    samples.append(("_sum", (), values.get(f"{metric.name}|sum_ns", 0) / 1e9))
    samples.append(("_count", (), running))
    return Family(metric, tuple(samples))


def _le(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(float(bound))


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def render(found: Iterable[Family]) -> bytes:
    """Text exposition format 0.0.4 of *found*, HELP and TYPE lines included."""
    lines = []
    for family in found:
        metric = family.metric
        lines.append(f"# HELP {metric.name} {_escape_help(metric.help)}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for suffix, labels, value in family.samples:
            name = metric.name + suffix
            if labels:
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
                lines.append(f"{name}{{{text}}} {_number(value)}")
            else:
                lines.append(f"{name} {_number(value)}")
    return ("\n".join(lines) + "\n").encode()


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
