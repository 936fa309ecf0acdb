"""Thousands of requests through each strategy leave no descriptor, thread or child behind."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

import sockserve
from support import address_for, connect, no_leaks, read_to_eof, serving, skip_unless_supported

#: Client threads driving each server: enough for requests to overlap.
CLIENT_THREADS = 4
#: The reply repeats the upper-cased request line this often (a few KiB per reply).
REPEAT = 300


class LineReply(sockserve.StreamRequestHandler):
    """Answer one request line with it upper-cased REPEAT times; the server closes first."""

    def handle(self) -> None:
        line = self.rfile.readline()
        self.wfile.write(line.upper() * REPEAT)


class DatagramUpper(sockserve.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(data.upper(), self.client_address)


def drive(count: int, worker: Callable[[range], list]) -> list:
    """Run *worker* over CLIENT_THREADS interleaved slices of range(count); join them all.

    Each worker returns the list of its failures; the combined list is returned.
    """
    failures: list = []

    def run(k: int) -> None:
        failures.extend(worker(range(k, count, CLIENT_THREADS)))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(CLIENT_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not any(thread.is_alive() for thread in threads), "client threads hung"
    return failures


@pytest.mark.parametrize(
    ("transport", "concurrency", "count"),
    [
        ("tcp", "sync", 3000),
        ("tcp", "threading", 3000),
        ("tcp", "forking", 1000),
        ("unix", "threading", 1000),
    ],
)
def test_thousands_of_connections_leave_nothing_behind(transport, concurrency, count, tmp_path):
    skip_unless_supported(transport, concurrency)
    cls = sockserve.compose(transport, concurrency)
    answered = []

    def clients(indexes: range) -> list:
        failures = []
        for i in indexes:
            request = b"request %d\n" % i
            try:
                with connect(server) as client:
                    client.sendall(request)
                    reply = read_to_eof(client)
            except OSError as exc:
                failures.append((i, repr(exc)))
                continue
            if reply != request.upper() * REPEAT:
                failures.append((i, f"{len(reply)} bytes: {reply[:40]!r}"))
            else:
                answered.append(i)
        return failures

    with no_leaks():
        with serving(cls(address_for(transport, tmp_path), LineReply)) as server:
            failures = drive(count, clients)
    assert failures == []
    assert sorted(answered) == list(range(count))


@pytest.mark.parametrize("concurrency", ["sync", "threading"])
def test_thousands_of_datagrams_leave_nothing_behind(concurrency, tmp_path):
    count = 3000
    cls = sockserve.compose("udp", concurrency)
    answered = []

    def clients(indexes: range) -> list:
        failures = []
        # One socket per client thread, one datagram in flight at a time.
        with connect(server) as client:
            for i in indexes:
                request = b"datagram %d" % i
                try:
                    client.send(request)
                    reply = client.recv(65536)
                except OSError as exc:
                    failures.append((i, repr(exc)))
                    continue
                if reply != request.upper():
                    failures.append((i, reply))
                else:
                    answered.append(i)
        return failures

    with no_leaks():
        with serving(cls(address_for("udp", tmp_path), DatagramUpper)) as server:
            failures = drive(count, clients)
    assert failures == []
    assert sorted(answered) == list(range(count))
