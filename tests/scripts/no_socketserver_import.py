"""Run by tests/test_public_surface.py: uses every part of sockserve, prints JSON true if socketserver got imported."""

from __future__ import annotations

import json
import sys

import sockserve
from sockserve.core import _cli  # noqa: F401  (the command line's imports count too)


def main() -> None:
    for name in sockserve.STANDARD_NAMES:
        getattr(sockserve, name)
    for kind in ("family", "socket_type", "transport", "concurrency", "plugin"):
        for name in sockserve.registry.names(kind):
            sockserve.registry.load(kind, name)
    print(json.dumps("socketserver" in sys.modules))


if __name__ == "__main__":
    main()
