"""sockserve's own built-ins through its conformance kit (``sockserve.testing``): the same
scenarios a third-party strategy, transport or layer runs in its own tests."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import sockserve
from sockserve.testing import (
    KIT_ADDRESS,
    KitLayer,
    LayerTests,
    StrategyTests,
    TransportTests,
)

# --------------------------------------------------------------------------- strategies


class TestSync(StrategyTests):
    strategy = "sync"


class TestThreading(StrategyTests):
    strategy = "threading"


class TestThreadpool(StrategyTests):
    strategy = "threadpool"
    options = {"threads": 4}


class TestForking(StrategyTests):
    strategy = "forking"
    forks = True


class TestPrefork(StrategyTests):
    strategy = "prefork"
    options = {"workers": 2}
    forks = True


class TestPreforkThreadpool(StrategyTests):
    """prefork with a thread pool in each worker, from the class order."""

    strategy = "prefork"
    mixins = (sockserve.ThreadpoolMixIn,)
    options = {"workers": 2, "threads": 4}
    forks = True


class TestPreforkInnerThreading(StrategyTests):
    """prefork with a thread per request in each worker, from the short form ``inner``."""

    strategy = "prefork"
    options = {"workers": 2, "inner": "threading"}
    forks = True


# --------------------------------------------------------------------------- transports


class TestTCP(TransportTests):
    transport = "tcp"
    strategies = ("sync", "threading", "forking")


class TestTCP6(TransportTests):
    transport = "tcp6"


class TestUDP(TransportTests):
    transport = "udp"
    strategies = ("sync", "threading", "forking")


class TestUDP6(TransportTests):
    transport = "udp6"


class TestUnixStream(TransportTests):
    transport = "unix"


class TestUnixDatagram(TransportTests):
    transport = "unix-dgram"


# --------------------------------------------------------------------------- layers


def refuse(client: socket.socket) -> None:
    """A client KitLayer refuses: its first byte is ``!``."""
    client.sendall(b"!please refuse\n")


class TestKitLayer(LayerTests):
    """The kit's own layer through the layer scenarios."""

    layer = KitLayer
    options = {"kit_timeout": 0.3}
    strategies = ("sync", "threading", "threadpool")
    expected_request = "Wrapped"
    expected_client = KIT_ADDRESS

    def failing_clients(self):
        # Under threadpool a silent client never reaches the layer (first_byte_timeout
        # closes it): half of KitLayer's greeting makes it readable, then it stalls.
        return {"timeout": lambda client: client.sendall(b"k"), "refused": refuse}


# --------------------------------------------------------------------------- the kit itself


def test_using_sockserve_imports_neither_the_kit_nor_pytest(tmp_path):
    script = Path(__file__).parent / "scripts" / "kit_not_imported.py"
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"pytest": False, "sockserve.testing": False}
