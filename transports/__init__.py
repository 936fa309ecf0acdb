"""Built-in address families (inet, inet6, unix), socket types (stream, dgram) and the
transports pairing them (tcp, tcp6, udp, udp6, unix, unix-dgram).

They are loaded through the ``sockserve.families``, ``sockserve.socket_types`` and
``sockserve.transports`` entry points, one module at a time; this package imports
nothing by itself so that asking for ``tcp`` imports only what ``tcp`` needs.
"""

__all__: list[str] = []
