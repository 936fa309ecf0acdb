"""Run by tests/test_hardening.py (overload): prints JSON figures of a server whose accept() gets EMFILE.

Usage: ``python accept_out_of_descriptors.py MODULE``, MODULE being ``socketserver`` or
``sockserve``. Runs in a process of its own: it lowers RLIMIT_NOFILE and uses up every
descriptor.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import resource
import socket
import statistics
import sys
import threading
import time

module = importlib.import_module(sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")


class Upper(module.BaseRequestHandler):
    def handle(self):
        self.request.settimeout(10)
        self.request.sendall(self.request.recv(1024).upper())


class Server(module.TCPServer):
    request_queue_size = 16
    turns = 0
    emfile = 0
    accepted = 0
    finished = 0

    def shutdown_request(self, request):
        super().shutdown_request(request)
        self.finished += 1  # the server's end of the connection is closed

    def service_actions(self):
        self.turns += 1  # one per turn of the serve loop
        super().service_actions()

    def get_request(self):
        try:
            request = super().get_request()
        except OSError as exc:
            if exc.errno == errno.EMFILE:
                self.emfile += 1
            raise
        self.accepted += 1
        return request


def settle(server):
    """Wait until the server has closed every connection it accepted."""
    deadline = time.monotonic() + 10
    while server.finished != server.accepted:
        assert time.monotonic() < deadline, "a request was not shut down"
        time.sleep(0.001)


def schedstat(fd):
    """Nanoseconds the thread ran on a CPU and waited for one (runnable, not running).

    *fd* is its /proc/self/task/TID/schedstat, opened while descriptors were free.
    """
    ran, waited, _ = os.pread(fd, 256, 0).split()
    return int(ran), int(waited)


def start(server):
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    return thread


def client_left_without_descriptor(server):
    """Use up every descriptor, then connect: the connection waits, accept() fails."""
    settle(server)
    client = socket.socket()
    client.settimeout(10)
    filler = []
    while True:
        try:
            filler.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as exc:
            assert exc.errno == errno.EMFILE, exc
            break
        assert len(filler) < 1000, "RLIMIT_NOFILE was not lowered"
    client.connect(server.server_address)
    return client, filler


def wait_for_failed_accept(server):
    """Return right after the loop's next failed accept(), when a back-off pause begins."""
    count, deadline = server.emfile, time.monotonic() + 10
    while server.emfile == count:
        assert time.monotonic() < deadline, "accept() stopped failing"
        time.sleep(0.001)


def exchange(payload):
    with socket.create_connection(server.server_address, timeout=10) as other:
        other.sendall(payload)
        return other.recv(1024).decode()


# glibc loads libgcc_s when a thread exits through pthread_exit (as a daemon thread does at
# interpreter exit): load it now, or a failing run ends in an abort instead of its error.
try:
    import ctypes
    ctypes.CDLL("libgcc_s.so.1")
except OSError:
    pass

result = {}
server = Server(("127.0.0.1", 0), Upper)
thread = start(server)
assert exchange(b"zero") == "ZERO"  # serving, with whatever serve_forever opens
settle(server)
serving_stats = os.open(f"/proc/self/task/{thread.native_id}/schedstat", os.O_RDONLY)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))

# Burst 1: how the serving thread spends a second with no descriptor left for accept().
client, filler = client_left_without_descriptor(server)
wait_for_failed_accept(server)
time.sleep(0.7)
# CPU share (time on a CPU / wall time) depends on what else the machine runs. CPU demand
# (time on a CPU or runnable waiting for one / wall time) is near 1 for a spinning thread
# however busy the machine is, and near 0 for one that sleeps; a sleeping thread's rare
# wake-ups can wait long for a CPU on a busy machine, and a virtual machine's stall can
# be charged to whichever thread was running, so both are also taken as the median of ten
# windows of 0.1 s (a spinning thread is busy in every window, a sleeping one in few).
turns, wall = server.turns, time.monotonic()
(ran_start, waited_start), cpu, demand = schedstat(serving_stats), [], []
for _ in range(10):
    (ran0, waited0), w0 = schedstat(serving_stats), time.monotonic()
    time.sleep(0.1)
    (ran1, waited1), w1 = schedstat(serving_stats), time.monotonic()
    cpu.append((ran1 - ran0) / 1e9 / (w1 - w0))
    demand.append((ran1 - ran0 + waited1 - waited0) / 1e9 / (w1 - w0))
elapsed = time.monotonic() - wall
ran_end, waited_end = schedstat(serving_stats)
result["turns_per_second"] = (server.turns - turns) / elapsed
result["cpu_total"] = (ran_end - ran_start) / 1e9 / elapsed
result["demand_total"] = (ran_end - ran_start + waited_end - waited_start) / 1e9 / elapsed
result["cpu_median"] = statistics.median(cpu)
result["demand_median"] = statistics.median(demand)
# shutdown() just as the longest back-off pause (0.5 s in sockserve) begins; three times,
# serving again in between (the loop's own descriptors come back as it stops), since a
# busy machine can delay any single wake-up.
result["shutdown_while_stuck"] = []
for attempt in range(3):
    if attempt:
        thread = start(server)
    wait_for_failed_accept(server)
    start_shutdown = time.monotonic()
    server.shutdown()
    result["shutdown_while_stuck"].append(time.monotonic() - start_shutdown)
    thread.join(10)
    result["stopped"] = not thread.is_alive()
result["emfile_burst1"] = server.emfile
for fd in filler:
    os.close(fd)
client.sendall(b"first")
thread = start(server)
result["first_reply"] = client.recv(1024).decode()  # the waiting connection comes first
client.close()
assert exchange(b"restarted") == "RESTARTED"

# Burst 2: out of descriptors again for a moment; served once they are free.
client, filler = client_left_without_descriptor(server)
wait_for_failed_accept(server)
time.sleep(0.2)
for fd in filler:
    os.close(fd)
client.sendall(b"second")
result["second_reply"] = client.recv(1024).decode()
client.close()
result["third_reply"] = exchange(b"third")
result["emfile_total"] = server.emfile
server.shutdown()
thread.join(10)
server.server_close()
print(json.dumps(result))
