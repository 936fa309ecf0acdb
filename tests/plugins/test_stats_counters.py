"""``SharedCounters.index`` / ``add_at`` / ``add_many_at`` (core/_shared.py), the hot-path
adds the ``stats`` plugin makes on every request: the same counts as ``add``, checked
indices, exact across processes. (The rest of SharedCounters: tests/core/test_shared.py.)"""

from __future__ import annotations

import os
import threading

import pytest

from sockserve.core import SharedCounters
from support import requires_fork


def test_add_at_an_index_counts_like_add_by_name():
    counters = SharedCounters(["a", "b", "c"], gauges=["g"])
    counters.add("a")
    counters.add_at(counters.index("a"), 2)
    counters.add_many_at([(counters.index("b"), 3), (counters.index("c"), 4)])
    assert counters.snapshot() == {"a": 3, "b": 3, "c": 4, "g": 0}


def test_an_unknown_name_or_a_wrong_index_adds_nothing_and_says_so():
    counters = SharedCounters(["a", "b"], gauges=["g"])
    with pytest.raises(KeyError, match=r"no counter 'x'; counters: a, b"):
        counters.index("x")
    with pytest.raises(KeyError):
        counters.index("g")  # a gauge is not a counter
    for wrong in (0, 3, -1):  # 0: the owner's pid; 3: the gauge's cell
        with pytest.raises(IndexError, match="no counter at"):
            counters.add_at(wrong)
    with pytest.raises(IndexError):
        counters.add_many_at([(counters.index("a"), 1), (3, 1)])
    assert counters.snapshot() == {"a": 0, "b": 0, "g": 0}  # nothing was added


def test_add_at_from_many_threads_loses_nothing():
    counters = SharedCounters(["n", "m"])
    n, m = counters.index("n"), counters.index("m")

    def work() -> None:
        for _ in range(2000):
            counters.add_at(n)
            counters.add_many_at(((n, 1), (m, 2)))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert counters.snapshot() == {"n": 8 * 2000 * 2, "m": 8 * 2000 * 2}


@requires_fork
def test_add_at_in_forked_processes_is_summed_exactly():
    counters = SharedCounters(["n"])
    at = counters.index("n")
    counters.add_at(at)
    pids = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            try:
                for _ in range(500):
                    counters.add_many_at(((at, 1),))
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert counters.snapshot() == {"n": 1 + 4 * 500}
