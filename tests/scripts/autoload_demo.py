"""Run by tests/core/test_hooks.py (run_autoload): prints JSON of whether the ``demo`` plugin got auto-loaded and ran.

Prints ``{"imported", "registered", "activated", "warnings", "names", "loads"}``: whether
``sockserve_demo_plugin`` was imported and registered as ``demo``, whether its activation
hook saw the server this script made, the warnings from importing sockserve to closing
that server, the plugin names the registry lists, and the module ``demo`` loads as.
"""

from __future__ import annotations

import json
import sys
import warnings


def main() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import sockserve

        manager = sockserve.get_plugin_manager()
        server = sockserve.TCPServer(("127.0.0.1", 0), sockserve.BaseRequestHandler)
        server.server_close()
    plugin = sys.modules.get("sockserve_demo_plugin")
    result = {
        "imported": plugin is not None,
        "registered": manager.get_plugin("demo") is not None,
        "activated": plugin.activated == [server.server_address[1]] if plugin else None,
        "warnings": [[w.category.__name__, str(w.message)] for w in caught],
        "names": sockserve.registry.names("plugin"),
        "loads": sockserve.registry.load("plugin", "demo").__name__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
