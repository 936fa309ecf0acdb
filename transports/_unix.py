"""The ``unix`` address family: filesystem paths and Linux abstract names.

A server removes the socket file it created when it closes, and only if the file at that
path is still the one it created. Binding over a stale socket file (no process listens on
it) replaces it; binding over a live one fails with ``EADDRINUSE`` and says so.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from typing import TYPE_CHECKING, Any

from ..core._errors import AddressError, BindError, PathTooLongError
from ..core._plugin_types import AddressFamily

if TYPE_CHECKING:
    from ..core._contract import Server as BaseServer

__all__ = ["UNIX", "UnixFamily"]

#: sizeof(sun_path) is 108 on Linux, one byte of it for the terminating NUL.
MAX_PATH_BYTES = 107


def _is_abstract(address: str | bytes) -> bool:
    return len(address) > 0 and address[0] in ("\0", 0)


class UnixFamily(AddressFamily):
    """``AF_UNIX`` addresses: a path (str, bytes or path-like) or ``'\\0name'``."""

    name = "unix"
    address_family = getattr(socket, "AF_UNIX", -1)
    expected = (
        f"a filesystem path (str, bytes or os.PathLike) of at most {MAX_PATH_BYTES} bytes, "
        "or an abstract name starting with '\\0'"
    )

    def check_address(self, address: Any) -> Any:
        if isinstance(address, os.PathLike):
            address = os.fspath(address)
        if not isinstance(address, (str, bytes)):
            raise AddressError(address, self.name, self.expected)
        raw = os.fsencode(address) if isinstance(address, str) else address
        if len(raw) > MAX_PATH_BYTES:
            raise PathTooLongError(
                address, self.name, self.expected, f"it is {len(raw)} bytes long"
            )
        return address

    def before_bind(self, server: BaseServer) -> None:
        path = server.server_address
        if _is_abstract(path) or not path:
            return
        try:
            st = os.stat(path)
        except OSError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise BindError(
                errno.EADDRINUSE,
                f"cannot bind unix socket {path!r}: a file that is not a socket is in the way",
                path,
            )
        probe = socket.socket(socket.AF_UNIX, server.socket.type)  # type: ignore[attr-defined]
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: nobody listens; replace it
            return
        except OSError:
            return  # let bind report whatever this is
        finally:
            probe.close()
        raise BindError(
            errno.EADDRINUSE,
            f"cannot bind unix socket {path!r}: another process is listening on it",
            path,
        )

    def bound_address(self, server: BaseServer) -> Any:
        given = server.server_address
        bound = server.socket.getsockname()  # type: ignore[attr-defined]
        if _is_abstract(given):
            # getsockname() gives bytes for abstract names; keep the type the user gave.
            if isinstance(given, str) and isinstance(bound, bytes):
                return bound.decode("utf-8", "surrogateescape")
            return bound
        if given and not _is_abstract(given):
            try:
                st = os.stat(given)
                server._unix_socket_file = (given, st.st_dev, st.st_ino, os.getpid())  # type: ignore[attr-defined]
            except OSError:
                pass
        return bound

    def release(self, server: BaseServer) -> None:
        created = getattr(server, "_unix_socket_file", None)
        if created is None:
            return
        server._unix_socket_file = None  # type: ignore[attr-defined]
        path, dev, ino, pid = created
        if pid != os.getpid():
            return  # a forked worker closing its copy: the file belongs to the parent
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == (dev, ino):
                os.unlink(path)
        except OSError:
            pass  # already gone, or replaced by someone else's file: leave it


UNIX = UnixFamily()
