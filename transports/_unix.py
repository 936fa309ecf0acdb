"""The ``unix`` address family: filesystem paths and Linux abstract names.

A server removes the socket file it created when it closes, and only if the file at that
path is still the one it created (a server on a given socket, ``from_socket``, created
none). Binding over a stale socket file (no process listens on it) replaces it; binding
over a live one fails with ``EADDRINUSE`` and says so.

``socket_mode`` (``UnixSocketOptions``, declared by ``UnixSocketMixIn``) sets the socket
file's permission bits after bind and before listen, so that no client connects while
the file has the mode the umask gave it (on Linux, ``fchmod`` on a socket before
``bind`` does not reach the file).
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
from typing import TYPE_CHECKING, Any

import attrs

from ..core._errors import AddressError, BindError, OptionError, PathTooLongError
from ..core._options import declare_options, option
from ..core._plugin_types import AddressFamily

if TYPE_CHECKING:
    from ..core._contract import Server as BaseServer

__all__ = ["UNIX", "UnixFamily", "UnixSocketMixIn", "UnixSocketOptions", "socket_mode_bits"]

#: sizeof(sun_path) is 108 on Linux, one byte of it for the terminating NUL.
MAX_PATH_BYTES = 107
#: The permission bits a socket file may be given (no setuid, setgid or sticky bit).
MODE_BITS = 0o777
_OCTAL = re.compile(r"(0o)?[0-7]{1,4}")


def socket_mode_bits(value: int | str) -> int:
    """The permission bits *value* gives: an int (``0o660``) or octal text (``"660"``,
    ``"0o660"``, ``"0660"``).

    :raises ValueError: not octal text, or bits beyond ``0o777``.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if not _OCTAL.fullmatch(text):
            raise ValueError(f"'socket_mode' must be octal permission bits such as 660 or 0o660 "
                             f"(got {value!r})")
        bits = int(text.removeprefix("0o"), 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        bits = value
    else:
        raise TypeError(f"'socket_mode' must be an int such as 0o660 or octal text such as '660' "
                        f"(got {value!r})")
    if not 0 <= bits <= MODE_BITS:
        raise ValueError(f"'socket_mode' must be permission bits 0o000-0o777 (got {value!r} = "
                         f"{oct(bits)}; an int is taken as it is: write 0o660, not 660)")
    return bits


@attrs.frozen
class _SocketModeCheck:
    def __call__(self, instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            socket_mode_bits(value)


@attrs.define
class UnixSocketOptions:
    """Options of the Unix socket transports."""

    #: Permission bits of the socket file, set after bind and before listen: 0o660 (or,
    #: as text, ``660`` / ``0o660``: octal). None leaves what the umask gives.
    #: (Text is read as a str first so that ``660`` stays octal.)
    socket_mode: str | int | None = option(_SocketModeCheck(), default=None)


@declare_options(UnixSocketOptions)
class UnixSocketMixIn:
    """Declares ``socket_mode`` for the ``unix`` and ``unix-dgram`` transports; the
    ``unix`` family applies it (``UnixFamily.bound_address``)."""

    socket_mode: int | str | None


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
        mode = getattr(server, "socket_mode", None)
        if mode is not None:
            # Bound, not listening yet: a stream client is refused until listen(), so the
            # first one that gets in sees this mode.
            if _is_abstract(given) or not given:
                raise OptionError("socket_mode", mode, "an abstract or unnamed Unix socket has no "
                                  "file to give permissions to")
            os.chmod(given, socket_mode_bits(mode))
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
        if created is None or not getattr(server, "owns_address", True):
            return  # nothing created here, or a given socket's (systemd's) file
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
