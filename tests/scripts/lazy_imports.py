"""Run by tests/core/test_registry.py: prints JSON [sockserve.* modules after import, after compose("tcp")]."""

from __future__ import annotations

import json
import sys

import sockserve


def main() -> None:
    after_import = sorted(m for m in sys.modules if m.startswith("sockserve."))
    sockserve.compose("tcp")
    after_compose = sorted(m for m in sys.modules if m.startswith("sockserve."))
    print(json.dumps([after_import, after_compose]))


if __name__ == "__main__":
    main()
