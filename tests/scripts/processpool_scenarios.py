"""Run by tests/test_third_party.py with the example's environment: runs scenario argv[1], prints one JSON line.

Usage: ``python processpool_scenarios.py SCENARIO ARGS``: ``pool TRANSPORT TMP``,
``seqpacket CONCURRENCY TMP`` or ``cutoff TRANSPORT TMP``, TMP a folder for Unix sockets.
Needs ``sockserve-processpool`` (examples/) installed.
"""

import json
import logging
import os
import signal
import socket
import sys
import threading
import time

# Configured before sockserve is imported: whatever is logged while importing it is formatted too.
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")

import sockserve  # noqa: E402
from sockserve_processpool.seqpacket import SeqpacketRequestHandler  # noqa: E402

TIMEOUT = 10.0


def children_of(pid):
    """Process ids whose parent is *pid* (live or zombie), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid:
                found.append(int(entry))
    return sorted(found)


def wait_until(predicate, what):
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


class PidEcho(sockserve.StreamRequestHandler):
    """Say which process handles the connection at once, then upper-case one line."""

    def handle(self):
        self.wfile.write(b"%d\n" % os.getpid())
        self.wfile.flush()
        self.wfile.write(self.rfile.readline().upper())


def address_for(transport, tmp):
    return {"tcp": ("127.0.0.1", 0), "tcp6": ("::1", 0)}.get(transport, os.path.join(tmp, "pool.sock"))


def connect(server):
    client = socket.socket(server.address_family, socket.SOCK_STREAM)
    client.settimeout(TIMEOUT)
    client.connect(server.server_address)
    return client


class Held:
    """A connected client that has not sent its line yet."""

    def __init__(self, server):
        self.sock = connect(server)
        self.reader = self.sock.makefile("rb")
        self.pid = None

    def handler_pid(self):
        """The pid the handler announced (waits until a worker handles the connection)."""
        if self.pid is None:
            self.pid = int(self.reader.readline())
        return self.pid

    def reply(self):
        """(pid, reply) once the line was sent; closes the client."""
        pid = self.handler_pid()
        text = self.reader.read().decode()
        self.reader.close()
        self.sock.close()
        return [pid, text]


def exchange_all(clients, payload):
    """Send a numbered line on every client first, then collect [pid, reply] of each."""
    for i, client in enumerate(clients):
        client.sock.sendall(b"%s %d\n" % (payload, i))
    return [client.reply() for client in clients]


def pool(transport, tmp):
    """Concurrent clients spread over the workers; a killed worker is replaced."""
    # A Unix socket refuses connect() at once (EAGAIN) when the backlog is full, and the
    # documented backlog of 5 is less than the clients connecting here at once.
    cls = sockserve.compose(transport, "processpool", options={"workers": 3, "request_queue_size": 32})
    server = cls(address_for(transport, tmp), PidEcho)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,))
    thread.start()
    manager = sockserve.get_plugin_manager()
    result = {"parent": os.getpid(), "class": cls.__name__, "workers": cls.workers,
              "backlog": server.request_queue_size,
              "counter_registered": manager.get_plugin("request-counter") is not None}
    try:
        wait_until(lambda: len(server.pool_pids()) == 3, "the pool")
        first_pool = server.pool_pids()
        result["pool"] = first_pool
        result["pool_are_children"] = children_of(os.getpid()) == sorted(first_pool)
        # Until a client sends its line, its worker stays busy with it; so the least busy
        # worker is a different one for each of the first three connections.
        clients = [Held(server) for _ in range(9)]
        result["first_three"] = [client.handler_pid() for client in clients[:3]]
        result["served"] = exchange_all(clients, b"hello")

        victim = first_pool[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: server.pool_pids() != first_pool, "a replacement worker")
        result["victim"] = victim
        result["new_pool"] = server.pool_pids()
        clients = [Held(server) for _ in range(3)]
        result["after_kill_first_three"] = [client.handler_pid() for client in clients]
        result["after_kill"] = exchange_all(clients, b"after")
        sequential = []
        for i in range(4):
            client = Held(server)
            client.sock.sendall(b"seq %d\n" % i)
            sequential.append(client.reply())
        result["sequential"] = sequential
    finally:
        server.shutdown()
        thread.join(TIMEOUT)
        server.server_close()
    result["children_after_close"] = children_of(os.getpid())
    result["serving_thread_alive"] = thread.is_alive()
    print(json.dumps(result))


class Numbered(SeqpacketRequestHandler):
    """Reply to each message with its number on the connection and the message upper-cased."""

    def setup(self):
        self.count = 0

    def handle_message(self, message):
        self.count += 1
        return b"%d:%s" % (self.count, message.upper())


def seqpacket(concurrency, tmp):
    """Two sends arrive as two messages and get two replies, on every strategy."""
    cls = sockserve.compose("unix-seqpacket", concurrency)
    path = os.path.join(tmp, "seq.sock")
    server = cls(path, Numbered)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,))
    thread.start()
    result = {
        "class": cls.__name__,
        "mro": [k.__name__ for k in cls.__mro__],
        "socket_type": int(server.socket.type),
        "distribution": sockserve.registry.info("transport", "unix-seqpacket").describe_distribution(),
    }
    try:
        conversations = []
        for _ in range(2):
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
                client.settimeout(TIMEOUT)
                client.connect(path)
                client.send(b"one")
                client.send(b"two")
                client.send(b"x" * 3000)
                first = client.recv(65536)
                second = client.recv(65536)
                third = client.recv(65536)
                client.shutdown(socket.SHUT_WR)
                eof = client.recv(65536)
                conversations.append([first.decode(), second.decode(), len(third), third[:2].decode(), eof.decode()])
        result["conversations"] = conversations
    finally:
        server.shutdown()
        thread.join(TIMEOUT)
        server.server_close()
    result["socket_file_left"] = os.path.exists(path)
    result["children_after_close"] = children_of(os.getpid())
    print(json.dumps(result))


def cutoff(transport, tmp):
    """requests_cut_off counts requests still running at the drain deadline, not workers."""
    result = {}
    for name, options, hold in [("stuck", {"workers": 2, "drain_timeout": 0.5}, True),
                                ("idle", {"workers": 2, "block_on_close": False}, False)]:
        cls = sockserve.compose(transport, "processpool", options=options)
        server = cls(address_for(transport, tmp), PidEcho)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,))
        thread.start()
        held = None
        try:
            wait_until(lambda server=server: len(server.pool_pids()) == 2, "the pool")
            done = Held(server)
            done.sock.sendall(b"done\n")
            result[name + "_served"] = done.reply()[1]
            # The client sees its reply before the worker reports the request done.
            wait_until(lambda server=server: sum(server.worker_requests.values()) == 1, "the done report")
            if hold:
                held = Held(server)
                held.handler_pid()  # a worker runs it, blocked reading the line
        finally:
            server.shutdown()
            thread.join(TIMEOUT)
            started = time.monotonic()
            server.server_close()
            result[name + "_close_seconds"] = time.monotonic() - started
        result[name + "_cut_off"] = server.requests_cut_off
        if held is not None:
            result[name + "_held_got"] = held.sock.recv(64).decode()  # EOF: its worker is gone
            held.sock.close()
        result[name + "_children_after_close"] = children_of(os.getpid())
    print(json.dumps(result))


if __name__ == "__main__":
    {"pool": pool, "seqpacket": seqpacket, "cutoff": cutoff}[sys.argv[1]](*sys.argv[2:])
