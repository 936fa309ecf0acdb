"""Run by tests/support.py probe_autoload: prints JSON of what became of one auto-loaded plugin.

Usage: ``python autoload_probe.py NAME``. Prints ``{"listed", "registered",
"autoload_attribute", "control_registered"}``: whether plugin NAME is listed and registered
with the plugin manager, its ``sockserve_autoload`` attribute (true when it has none), and
whether the control plugin ``probe`` got registered (that autoload ran at all).
"""

from __future__ import annotations

import json
import sys

import sockserve


def main() -> None:
    name = sys.argv[1]
    manager = sockserve.get_plugin_manager()
    plugin = sockserve.registry.load("plugin", name)
    print(json.dumps({
        "listed": name in sockserve.registry.names("plugin"),
        "registered": manager.get_plugin(name) is not None or plugin in manager.get_plugins(),
        "autoload_attribute": getattr(plugin, "sockserve_autoload", True),
        "control_registered": manager.get_plugin("probe") is not None,
    }))


if __name__ == "__main__":
    main()
