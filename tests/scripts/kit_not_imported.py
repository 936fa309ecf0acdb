"""Use every part of sockserve, then say whether pytest or the testing kit got imported.

Usage: ``python kit_not_imported.py``. Prints one JSON line: ``{"pytest": bool,
"sockserve.testing": bool}``, each true when that module is in ``sys.modules``.
"""

from __future__ import annotations

import json
import sys

import sockserve
import sockserve.concurrency


def main() -> None:
    for name in sockserve.STANDARD_NAMES:
        getattr(sockserve, name)
    for kind in ("family", "socket_type", "transport", "concurrency", "layer", "plugin"):
        for name in sockserve.registry.names(kind):
            sockserve.registry.load(kind, name)
    print(json.dumps({name: name in sys.modules for name in ("pytest", "sockserve.testing")}))


if __name__ == "__main__":
    main()
