"""Per-server plugin state and counters shared with forked workers (core/_shared.py).

``plugin_state`` makes a plugin's state once per server and key; ``SharedCounters`` adds
up exactly across real forked processes and their threads: the counts the parent reads
after ``waitpid`` are compared with what every process added.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
import traceback
from collections.abc import Callable

import pytest

import sockserve

# Public as sockserve.plugin_state / sockserve.SharedCounters once the package exports them.
from sockserve.core._shared import SharedCounters, plugin_state
from support import exchange, requires_fork, serving

#: Seconds a forked child may run before it kills itself (a hang fails the test, not CI).
CHILD_LIMIT = 30


def fork(body: Callable[[], None]) -> int:
    """Run *body* in a forked child that exits 0 when it returned, 1 when it raised."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(CHILD_LIMIT)
            body()
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    return pid


def wait_all(pids: list[int], timeout: float = CHILD_LIMIT + 5) -> list[int]:
    """Reap *pids*; return their exit statuses (a child still running at the end is killed)."""
    deadline = time.monotonic() + timeout
    statuses = {}
    while len(statuses) < len(pids):
        for pid in pids:
            if pid not in statuses:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    statuses[pid] = os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            for pid in set(pids) - set(statuses):
                os.kill(pid, signal.SIGKILL)
                statuses[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            break
        time.sleep(0.005)
    return [statuses[pid] for pid in pids]


def in_threads(count: int, body: Callable[[], None]) -> None:
    """Run *body* in *count* threads started together; re-raise the first failure."""
    start = threading.Barrier(count)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            start.wait(10)
            body()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CHILD_LIMIT)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]


def adder(counters: SharedCounters, name: str, times: int, amount: int = 1) -> Callable[[], None]:
    def body() -> None:
        for _ in range(times):
            counters.add(name, amount)

    return body


# --------------------------------------------------------------------------- plugin state


class Holder:
    """Stands in for a server: any object with a __dict__."""


def test_plugin_state_is_made_once_per_server_and_key():
    made = []

    def factory() -> list[int]:
        made.append(1)
        return []

    first, second = Holder(), Holder()
    state = plugin_state(first, "mine", factory)
    assert plugin_state(first, "mine", factory) is state
    assert plugin_state(second, "mine", factory) is not state
    assert plugin_state(first, "other", dict) == {}
    assert plugin_state(first, "other", dict) is not state
    assert len(made) == 2


def test_plugin_state_factory_runs_once_when_threads_race():
    calls = []

    def slow_factory() -> object:
        calls.append(threading.get_ident())
        time.sleep(0.01)  # let the other threads arrive while this one is still making it
        return object()

    server = Holder()
    seen: list[object] = []
    in_threads(16, lambda: seen.append(plugin_state(server, "key", slow_factory)))
    assert len(calls) == 1
    assert len(seen) == 16 and all(s is seen[0] for s in seen)


def test_plugin_state_of_a_real_server_is_per_server(tmp_path):
    key = object()  # a plugin object works as its own key
    with sockserve.TCPServer(("127.0.0.1", 0), sockserve.BaseRequestHandler) as one, \
            sockserve.TCPServer(("127.0.0.1", 0), sockserve.BaseRequestHandler) as two:
        assert plugin_state(one, key, list) is plugin_state(one, key, list)
        assert plugin_state(one, key, list) is not plugin_state(two, key, list)


# --------------------------------------------------------------------------- one process


def test_counters_count_adds_in_one_process():
    counters = SharedCounters(["accepted", "finished", "in_flight"])
    assert counters.names == ("accepted", "finished", "in_flight")
    assert counters.snapshot() == {"accepted": 0, "finished": 0, "in_flight": 0}
    counters.add("accepted")
    counters.add("accepted", 4)
    counters.add("in_flight", 3)
    counters.add("in_flight", -2)
    assert counters.snapshot() == {"accepted": 5, "finished": 0, "in_flight": 1}
    counters.close()


def test_threads_of_one_process_lose_no_add():
    counters = SharedCounters(["n"])
    in_threads(8, adder(counters, "n", 5000))
    assert counters.snapshot() == {"n": 40000}


def test_an_unknown_counter_name_lists_the_names():
    counters = SharedCounters(["a", "b"])
    with pytest.raises(KeyError) as caught:
        counters.add("c")
    assert caught.value.args[0] == "no counter 'c'; counters: a, b"


@pytest.mark.parametrize("names", [[], ["a", ""], ["a", "a"], ["a", 3]])
def test_bad_names_are_refused(names):
    with pytest.raises(ValueError, match="SharedCounters"):
        SharedCounters(names)


def test_closed_counters_refuse_adds_and_counters_do_not_pickle():
    counters = SharedCounters(["a"])
    with pytest.raises(TypeError, match="shared by forking"):
        pickle.dumps(counters)
    counters.close()
    with pytest.raises(ValueError):
        counters.add("a")


# --------------------------------------------------------------------------- across processes


@requires_fork
def test_forked_children_and_their_threads_add_exactly():
    counters = SharedCounters(["requests", "bytes"])
    counters.add("requests", 7)  # the parent holds a row before it forks

    def child() -> None:
        in_threads(4, adder(counters, "requests", 2000))
        counters.add("bytes", 100)

    pids = [fork(child) for _ in range(8)]
    in_threads(2, adder(counters, "requests", 3000))  # the parent adds meanwhile
    assert wait_all(pids) == [0] * 8
    assert counters.snapshot() == {"requests": 7 + 8 * 4 * 2000 + 2 * 3000, "bytes": 800}


@requires_fork
def test_more_processes_at_once_than_rows_still_count_exactly():
    counters = SharedCounters(["n"], slots=2)
    go_read, go_write = os.pipe()

    def child() -> None:
        os.read(go_read, 1)  # all start together, so that they hold their rows at once
        in_threads(2, adder(counters, "n", 500))

    pids = [fork(child) for _ in range(6)]
    os.close(go_read)
    os.write(go_write, b"x" * 6)
    os.close(go_write)
    counters.add("n", 1)
    assert wait_all(pids) == [0] * 6
    assert counters.snapshot() == {"n": 6 * 2 * 500 + 1}


@requires_fork
def test_rows_of_exited_processes_are_reused_and_keep_their_counts():
    counters = SharedCounters(["n"], slots=1)
    for i in range(10):  # one at a time: each takes over the row of the one before
        assert wait_all([fork(adder(counters, "n", i + 1))]) == [0]
    assert counters.snapshot() == {"n": sum(range(1, 11))}


@requires_fork
def test_grandchildren_add_to_the_same_counters():
    counters = SharedCounters(["n"])

    def child() -> None:
        counters.add("n", 10)
        assert wait_all([fork(adder(counters, "n", 1, 100))]) == [0]
        counters.add("n", 1000)

    assert wait_all([fork(child), fork(child)]) == [0, 0]
    assert counters.snapshot() == {"n": 2 * 1110}


@requires_fork
def test_a_fork_while_another_thread_adds_leaves_the_child_able_to_add():
    counters = SharedCounters(["thread", "children"])
    stop = threading.Event()
    added = []

    def busy() -> None:  # holds the counters' lock most of the time
        n = 0
        while not stop.is_set():
            counters.add("thread")
            n += 1
        added.append(n)

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        pids = [fork(lambda: counters.add("children")) for _ in range(20)]
    finally:
        stop.set()
        thread.join(10)
    assert wait_all(pids, timeout=20) == [0] * 20
    assert counters.snapshot() == {"thread": added[0], "children": 20}


class CountingHandler(sockserve.BaseRequestHandler):
    """Count the request in the server's shared counters (in the forked child), then reply."""

    def handle(self) -> None:
        self.request.recv(1024)
        counters = plugin_state(self.server, "counting", lambda: None)
        if os.getpid() != self.server.parent_pid:  # in the forked child, as documented
            counters.add("handled")
        self.request.sendall(b"ok")


@requires_fork
def test_a_forking_server_parent_sees_every_childs_count():
    class Counting(sockserve.ForkingTCPServer):
        def server_activate(self) -> None:
            super().server_activate()
            self.parent_pid = os.getpid()
            plugin_state(self, "counting", lambda: SharedCounters(["handled"]))

    with serving(Counting(("127.0.0.1", 0), CountingHandler)) as server:
        replies = [exchange(server, b"?") for _ in range(12)]
        counters = plugin_state(server, "counting", lambda: None)
    assert replies == [b"ok"] * 12
    # server_close() waited for the children: every one of them has added.
    assert counters.snapshot() == {"handled": 12}


def test_counters_need_no_descriptor_each():
    before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    many = [SharedCounters(["a"]) for _ in range(50)]
    for counters in many:
        counters.add("a")
    if before is not None:
        assert len(os.listdir("/proc/self/fd")) <= before + 1  # at most the one claim lock
    assert sum(c.snapshot()["a"] for c in many) == 50

