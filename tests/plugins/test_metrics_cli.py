"""``sockserve serve --metrics HOST:PORT`` (the CLI wiring of the stats plugin's side
listener): the startup output gives the real metrics address for port 0, the supervisor
answers scrapes under prefork, and a busy address exits 2 before serving, leaking nothing.

Skipped until core/_cli.py / core/_cli_serve.py take the --metrics flag (issue 10)."""

from __future__ import annotations

import re
import signal
import socket
import urllib.request

import pytest

from support import ask_stream, clean_env, read_banner, requires_fork, sockserve_process


METRICS_LINE = re.compile(rb"sockserve: metrics on http://(\S+):(\d+)/metrics\n")
SERVING = re.compile(rb"serving on (\S+):(\d+) with")


@requires_fork
def test_serve_with_metrics_port_0_reports_the_address_and_the_supervisor_answers(tmp_path):
    args = ("serve", "127.0.0.1:0", "--concurrency", "prefork", "-w", "2",
            "--metrics", "127.0.0.1:0")
    with sockserve_process(*args, cwd=tmp_path, env=clean_env(), timeout=60) as proc:
        seen = read_banner(proc, 60, until=METRICS_LINE.search)
        serving = SERVING.search(seen)
        metrics = METRICS_LINE.search(seen)
        assert serving and metrics, seen
        address = (serving.group(1).decode(), int(serving.group(2)))
        for i in range(5):
            assert ask_stream(address, b"m %d\n" % i) == b"M %d\n" % i
        url = f"http://{metrics.group(1).decode()}:{int(metrics.group(2))}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            text = reply.read().decode()
        assert re.search(r'^sockserve_requests_total\{outcome="ok"\} 5$', text, re.M), text
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    with pytest.raises(OSError):  # closed with the server
        socket.create_connection(("127.0.0.1", int(metrics.group(2))), timeout=2).close()


def test_a_busy_metrics_address_exits_2_before_serving(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with socket.socket() as probe:  # the server address it would have served on
            probe.bind(("127.0.0.1", 0))
            serve_port = probe.getsockname()[1]
        args = ("serve", f"127.0.0.1:{serve_port}", "--metrics", f"127.0.0.1:{port}")
        with sockserve_process(*args, cwd=tmp_path, env=clean_env(), timeout=60) as proc:
            out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert f"cannot bind the metrics address 127.0.0.1:{port}".encode() in err, err
    assert b"serving on" not in err
    # Nothing stayed bound: the server's own address is free again.
    with socket.socket() as again:
        again.bind(("127.0.0.1", serve_port))


@pytest.mark.parametrize("value", ["::1:80", "host:port", "1.2.3.4:99999"])
def test_a_bad_metrics_address_exits_2_naming_the_shapes(tmp_path, value):
    with sockserve_process("serve", "127.0.0.1:0", "--metrics", value, cwd=tmp_path,
                           env=clean_env(), timeout=60) as proc:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert b"HOST:PORT, [IPV6]:PORT or PORT" in err, err
