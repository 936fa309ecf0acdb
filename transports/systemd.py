"""Socket activation and sd_notify, for code that builds its servers itself.

``adopt("systemd")`` (or ``"systemd:NAME"``, ``"fd://N"``) returns a socket passed by
systemd; ``TCPServer.from_socket(sock, Handler)`` (every transport's class has it) serves
on it; ``transport_for(sock)`` names the transport that fits; ``notify("READY=1")`` talks
to ``$NOTIFY_SOCKET``. See docs/operations.md, "systemd".
"""

from ._systemd import (
    SD_LISTEN_FDS_START,
    ActivationError,
    SocketMismatchError,
    adopt,
    listen_fds,
    notify,
    transport_for,
)

__all__ = [
    "SD_LISTEN_FDS_START",
    "ActivationError",
    "SocketMismatchError",
    "adopt",
    "listen_fds",
    "notify",
    "transport_for",
]
