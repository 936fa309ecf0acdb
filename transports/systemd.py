"""Socket activation and sd_notify, for code that builds its servers itself.

``adopt("systemd")`` (or ``"systemd:NAME"``, ``"fd://N"``) returns a socket passed by
systemd, ``adopt_all("systemd")`` every one of them; ``TCPServer.from_socket(sock,
Handler)`` (every transport's class has it) serves on one, ``add_listener`` on the others;
``transport_for(sock)`` names the transport that fits; ``notify("READY=1")`` talks to
``$NOTIFY_SOCKET``. See docs/operations.md, "systemd".
"""

from ._systemd import (
    SD_LISTEN_FDS_START,
    ActivationError,
    SocketMismatchError,
    adopt,
    adopt_all,
    listen_fds,
    notify,
    transport_for,
)

__all__ = [
    "SD_LISTEN_FDS_START",
    "ActivationError",
    "SocketMismatchError",
    "adopt",
    "adopt_all",
    "listen_fds",
    "notify",
    "transport_for",
]
