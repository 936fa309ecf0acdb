"""The ``stats`` plugin's public home: ``Stats``, the ``/metrics`` side listener, the
``prometheus_client`` collector and the statsd emitter (docs/operations.md lists the metrics).

::

    from sockserve.plugins.stats import Collector, Stats

    stats = Stats(metrics_address=("127.0.0.1", 9100))   # bound now
    Server = sockserve.compose("tcp", "prefork", plugins=[stats])
"""

from ._metrics import CONTENT_TYPE, METRICS, Family, Metric
from ._prometheus import Collector, MetricsListener, parse_metrics_address
from ._stats import BUCKETS, STATS, Stats, stats_from_flags
from ._statsd import StatsdEmitter

__all__ = [
    "BUCKETS",
    "CONTENT_TYPE",
    "Collector",
    "Family",
    "METRICS",
    "Metric",
    "MetricsListener",
    "STATS",
    "Stats",
    "StatsdEmitter",
    "parse_metrics_address",
    "stats_from_flags",
]

# Report the public home in reprs, tracebacks and pickles.
for _obj in (Collector, Family, Metric, MetricsListener, Stats, StatsdEmitter,
             parse_metrics_address, stats_from_flags):
    _obj.__module__ = __name__
del _obj
