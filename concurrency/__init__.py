"""Built-in concurrency strategies (sync, threading, forking, threadpool, prefork), loaded
through the ``sockserve.concurrency`` entry points, and the drain helpers every strategy's
``server_close`` is made of and those of a strategy with supervised worker processes
(public: a third-party strategy gets a correct drain and supervision from them).
Importing this package loads no strategy."""

from ._drain import (
    CUT_OFF_GRACE,
    TERMINATE_GRACE,
    drain_deadline,
    reap,
    stop_processes,
    wait_threads,
)
from ._slots import (
    RESPAWN_DELAY,
    SupervisionOptions,
    WorkerBootError,
    WorkerSlots,
    WorkerStatus,
)
from ._supervise import (
    STOP_SIGNALS,
    check_reuse_port,
    exit_child,
    fork_worker,
    reuse_port_socket,
    stop_listening,
    stop_on_signals,
    with_inner_strategy,
)

__all__ = [
    "CUT_OFF_GRACE",
    "RESPAWN_DELAY",
    "STOP_SIGNALS",
    "SupervisionOptions",
    "TERMINATE_GRACE",
    "WorkerBootError",
    "WorkerSlots",
    "WorkerStatus",
    "check_reuse_port",
    "drain_deadline",
    "exit_child",
    "fork_worker",
    "reap",
    "reuse_port_socket",
    "stop_listening",
    "stop_on_signals",
    "stop_processes",
    "wait_threads",
    "with_inner_strategy",
]
