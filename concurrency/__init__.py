"""Built-in concurrency strategies (sync, threading, forking, threadpool, prefork), loaded
through the ``sockserve.concurrency`` entry points, and the drain helpers every strategy's
``server_close`` is made of (public: a third-party strategy gets a correct drain from them).
Importing this package loads no strategy."""

from ._drain import (
    CUT_OFF_GRACE,
    TERMINATE_GRACE,
    drain_deadline,
    reap,
    stop_processes,
    wait_threads,
)

__all__ = [
    "CUT_OFF_GRACE",
    "TERMINATE_GRACE",
    "drain_deadline",
    "reap",
    "stop_processes",
    "wait_threads",
]
