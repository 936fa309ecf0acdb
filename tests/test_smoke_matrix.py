"""Every transport x concurrency combination answers a real client and leaks nothing."""

from __future__ import annotations

import pytest

import sockserve
from support import (
    CONCURRENCY,
    TRANSPORTS,
    EchoUpper,
    address_for,
    exchange,
    no_leaks,
    serving,
    skip_unless_supported,
)


@pytest.mark.parametrize("concurrency", CONCURRENCY)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_echo_over_every_transport_and_strategy(transport, concurrency, tmp_path):
    skip_unless_supported(transport, concurrency)
    cls = sockserve.compose(transport, concurrency)
    with no_leaks():
        with serving(cls(address_for(transport, tmp_path), EchoUpper)) as server:
            for i in range(5):
                assert exchange(server, b"hello %d" % i, tmp_path) == b"HELLO %d" % i
