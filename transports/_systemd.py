"""Socket activation and service notification, as systemd's ``sd-daemon`` does them.

No libsystemd: the protocols are environment variables and one datagram.

- ``listen_fds()`` reads ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` exactly as
  ``sd_listen_fds_with_names`` does: the descriptors are for this process only if
  ``LISTEN_PID`` is its pid; they start at 3 (``SD_LISTEN_FDS_START``); a missing
  ``LISTEN_FDNAMES`` names each one ``unknown``; each is made close-on-exec; the variables
  are unset afterwards (also when something was wrong) so that children never see them.
- ``adopt(spec)`` turns an address ``fd://N``, ``systemd`` or ``systemd:NAME`` into a
  socket object whose family and type come from the descriptor; servers are built on it
  with ``ServerClass.from_socket(sock, Handler)``. The sockets passed to this process are
  remembered (the variables are gone once read), and each is handed out once
  (``fd://N`` is taken as given, every time).
- ``notify(message)`` sends an ``sd_notify`` message to ``$NOTIFY_SOCKET`` (a path, or an
  abstract name written ``@name``); without a receiver it returns False, never raises.
- ``transport_for(sock)`` names the transport serving a socket (``tcp``, ``udp6``,
  ``unix-dgram``...).
"""

from __future__ import annotations

import os
import re
import socket
import stat
import threading
from typing import TYPE_CHECKING

from ..core._errors import SockserveError

if TYPE_CHECKING:
    from ..core._registry import Registry

__all__ = [
    "SD_LISTEN_FDS_START",
    "ActivationError",
    "SocketMismatchError",
    "listen_fds",
    "adopt",
    "is_activation_address",
    "notify",
    "watchdog_interval",
    "transport_for",
    "describe_socket",
]

#: The first descriptor systemd passes; the others follow it.
SD_LISTEN_FDS_START = 3
#: The variables socket activation sets (all unset once read).
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
#: A descriptor systemd passed without a name (no ``LISTEN_FDNAMES``) is called so.
UNKNOWN_NAME = "unknown"
#: Seconds ``notify`` waits for room in the receiver's queue before giving up on a message.
NOTIFY_TIMEOUT = 1.0
ACTIVATION_SHAPES = "fd://N, systemd or systemd:NAME"

_DIGITS = re.compile(r"[0-9]+")


class ActivationError(SockserveError, ValueError):
    """A socket-activation address cannot be served; the message says why."""


class SocketMismatchError(ActivationError, TypeError):
    """A given socket's family or type is not the one the server class serves.

    :ivar socket_family: the socket's ``AF_*``.
    :ivar socket_type: the socket's ``SOCK_*``.
    :ivar server_class: the class that was asked to serve it.
    """

    def __init__(self, message: str, socket_family: int, socket_type: int, server_class: type) -> None:
        super().__init__(message)
        self.socket_family = socket_family
        self.socket_type = socket_type
        self.server_class = server_class


# --------------------------------------------------------------------------- LISTEN_FDS


def _number(variable: str, text: str) -> int:
    if not _DIGITS.fullmatch(text):
        raise ActivationError(f"{variable}={text!r} is not a number")
    return int(text)


def _read_listen_fds(unset_environment: bool) -> tuple[list[tuple[int, str]], str]:
    """``sd_listen_fds_with_names``: the descriptors and their names, or ``([], why)``."""
    environ = os.environ
    try:
        pid_text = environ.get("LISTEN_PID")
        if pid_text is None:
            return [], "LISTEN_PID is not set"
        pid = _number("LISTEN_PID", pid_text)
        if pid != os.getpid():
            return [], f"LISTEN_PID={pid} is not this process (pid {os.getpid()})"
        count_text = environ.get("LISTEN_FDS")
        if count_text is None:
            return [], "LISTEN_FDS is not set"
        count = _number("LISTEN_FDS", count_text)
        if count == 0:
            return [], "LISTEN_FDS=0"
        names_text = environ.get("LISTEN_FDNAMES")
        if names_text is None:
            names = [UNKNOWN_NAME] * count
        else:
            names = names_text.split(":")  # empty names are names too, as systemd reads them
            if len(names) != count:
                raise ActivationError(
                    f"LISTEN_FDNAMES={names_text!r} names {len(names)} descriptor(s) but "
                    f"LISTEN_FDS={count}"
                )
        fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
        for fd in fds:
            try:
                os.set_inheritable(fd, False)  # FD_CLOEXEC: no further inheritance
            except OSError as exc:
                raise ActivationError(
                    f"LISTEN_FDS={count} but descriptor {fd} is not open: {exc.strerror}"
                ) from None
        return list(zip(fds, names)), ""
    finally:
        if unset_environment:
            for variable in LISTEN_VARIABLES:
                environ.pop(variable, None)


def listen_fds(unset_environment: bool = True) -> list[tuple[int, str]]:
    """Return the descriptors socket activation passed to this process, with their names.

    As ``sd_listen_fds_with_names``: nothing unless ``LISTEN_PID`` is this process's pid;
    descriptors from ``SD_LISTEN_FDS_START`` (3) on, ``LISTEN_FDS`` of them, each made
    close-on-exec; names from the colon-separated ``LISTEN_FDNAMES`` (``"unknown"`` each
    when it is missing). With *unset_environment* the three variables are removed, whatever
    the outcome, so that child processes do not see them.

    :raises ActivationError: a variable is malformed (not a number, names not matching
        the count) or a descriptor it announces is not open.
    """
    return _read_listen_fds(unset_environment)[0]


_lock = threading.Lock()
#: (pid, the descriptors passed to that process): the variables are gone once read.
_passed: tuple[int, list[tuple[int, str]]] | None = None
#: Passed descriptors handed out by adopt(): each is adopted once (its number may be
#: reused by an unrelated file once the server closes it).
_claimed: set[int] = set()


def _passed_sockets() -> tuple[list[tuple[int, str]], str]:
    global _passed
    pid = os.getpid()
    if _passed is not None and _passed[0] == pid:
        return _passed[1], ""
    if _passed is not None:  # a forked child: the variables were its parent's
        return [], "the sockets were passed to the parent process"
    fds, why = _read_listen_fds(True)
    if fds:
        _passed = (pid, fds)
    return fds, why


# --------------------------------------------------------------------------- adopt


def is_activation_address(text: str) -> bool:
    """True for ``fd://N``, ``systemd`` and ``systemd:NAME`` (what ``adopt`` takes)."""
    return text.startswith("fd://") or text == "systemd" or text.startswith("systemd:")


def _kind_of(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a pipe or FIFO"), (stat.S_ISREG, "a regular file"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a socket"


def _socket_at(fd: int, what: str) -> socket.socket:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ActivationError(f"{what}: descriptor {fd} is not open ({exc.strerror})") from None
    if not stat.S_ISSOCK(mode):
        raise ActivationError(f"{what}: descriptor {fd} is not a socket (it is {_kind_of(mode)})")
    sock = socket.socket(fileno=fd)  # family, type and protocol read from the descriptor
    try:
        sock.set_inheritable(False)
    except OSError:
        sock.detach()  # the descriptor stays the caller's
        raise
    return sock


def _activation_name(spec: str) -> str | None:
    """The NAME of ``systemd:NAME`` (None for ``systemd``); ``ActivationError`` for any
    other shape, an empty name included."""
    if spec != "systemd" and not spec.startswith("systemd:"):
        raise ActivationError(f"{spec!r} is not a socket-activation address; expected {ACTIVATION_SHAPES}")
    name = spec[len("systemd:"):] if spec.startswith("systemd:") else None
    if name == "":
        raise ActivationError("'systemd:' has an empty name; expected systemd or systemd:NAME")
    return name


def _passed_or_raise(spec: str) -> tuple[list[tuple[int, str]], str]:
    """The passed sockets as (fd, name) and their listing for messages (call with
    ``_lock`` held); ``ActivationError`` naming *spec* when none was passed."""
    passed, why = _passed_sockets()
    if not passed:
        raise ActivationError(
            f"{spec}: no sockets were passed to this process ({why}); start it from a "
            "systemd .socket unit or systemd-socket-activate, or give another address"
        )
    return passed, ", ".join(f"{n!r} (fd {fd})" for fd, n in passed)


def adopt(spec: str) -> socket.socket:
    """Return the socket an activation address names, ready for ``from_socket``.

    - ``fd://N``: descriptor N, which must be an open socket (made close-on-exec);
    - ``systemd``: the one socket systemd passed (``LISTEN_FDS``);
    - ``systemd:NAME``: the one passed socket named NAME (``FileDescriptorName=``,
      ``LISTEN_FDNAMES``).

    The socket object owns the descriptor from now on: closing it (``server_close``)
    closes the descriptor.

    :raises ActivationError: the address is malformed, the descriptor is not open or not
        a socket, nothing was passed (and why: no ``LISTEN_PID``, another process's...),
        the name is not among those passed (the message lists them), or several were
        passed and none was chosen.
    """
    if spec.startswith("fd://"):
        text = spec[len("fd://"):]
        if not _DIGITS.fullmatch(text):
            raise ActivationError(f"{spec!r}: expected fd://N with N a descriptor number, e.g. fd://3")
        return _socket_at(int(text), spec)
    name = _activation_name(spec)
    with _lock:
        passed, listing = _passed_or_raise(spec)
        if name is None:
            choice = [(fd, n) for fd, n in passed if fd not in _claimed]
            if len(passed) > 1:
                raise ActivationError(
                    f"systemd: {len(passed)} sockets were passed ({listing}); choose one with "
                    "systemd:NAME, or serve them all (adopt_all; sockserve serve does)"
                )
        else:
            choice = [(fd, n) for fd, n in passed if n == name]
            if not choice:
                raise ActivationError(f"{spec}: no socket named {name!r} was passed; passed: {listing}")
            if len(choice) > 1:
                raise ActivationError(
                    f"{spec}: {len(choice)} sockets are named {name!r} ({listing}); give each "
                    "its own FileDescriptorName=, or serve them all (adopt_all)"
                )
        if not choice or choice[0][0] in _claimed:
            raise ActivationError(f"{spec}: the socket ({listing}) is adopted already")
        fd = choice[0][0]
        sock = _socket_at(fd, f"{spec} ({choice[0][1]!r})")
        _claimed.add(fd)
    return sock


def adopt_all(spec: str = "systemd") -> list[socket.socket]:
    """Return every socket an activation address names, for one server to serve them all
    (``from_socket`` with the first, ``add_listener`` with the others).

    - ``systemd``: every passed socket not adopted yet, in ``LISTEN_FDS`` order;
    - ``systemd:NAME``: every passed socket named NAME;
    - ``fd://N``: that one socket.

    On failure no socket is left open and none counts as adopted.

    :raises ActivationError: as ``adopt`` does; also when every passed socket was adopted.
    """
    if spec.startswith("fd://"):
        return [adopt(spec)]
    name = _activation_name(spec)
    with _lock:
        passed, listing = _passed_or_raise(spec)
        chosen = [(fd, n) for fd, n in passed if name is None or n == name]
        if not chosen:
            raise ActivationError(f"{spec}: no socket named {name!r} was passed; passed: {listing}")
        chosen = [(fd, n) for fd, n in chosen if fd not in _claimed]
        if not chosen:
            raise ActivationError(f"{spec}: every socket it names ({listing}) is adopted already")
        sockets: list[socket.socket] = []
        try:
            for fd, n in chosen:
                sockets.append(_socket_at(fd, f"{spec} ({n!r})"))
        except BaseException:
            for sock in sockets:
                sock.detach()  # not ours to close: systemd passed it, it stays unadopted
            raise
        _claimed.update(fd for fd, _ in chosen)
    return sockets


def _forget() -> None:
    """Forget the passed and adopted descriptors (for tests that adopt in-process)."""
    global _passed
    with _lock:
        _passed = None
        _claimed.clear()


# --------------------------------------------------------------------------- sockets and transports


def _constant(value: int, prefix: str) -> str:
    for name in dir(socket):
        if name.startswith(prefix) and getattr(socket, name) == value:
            return name
    return f"{prefix}{value}"


def describe_socket(family: int, socket_type: int) -> str:
    """``"AF_INET6/SOCK_DGRAM"``."""
    return f"{_constant(int(family), 'AF_')}/{_constant(int(socket_type), 'SOCK_')}"


#: Built-in transports, asked first: a third party's transport over the same family and
#: type (a TLS one, say) is chosen only by name.
_BUILTIN_ORDER = ("tcp", "tcp6", "udp", "udp6", "unix", "unix-dgram")


def transport_for(sock: socket.socket, registry: Registry | None = None) -> str:
    """Return the name of the transport that serves *sock*'s family and type.

    :raises SocketMismatchError: no installed transport serves that pair.
    """
    from ..core._errors import PluginLoadError
    from ..core._registry import registry as default_registry

    reg = registry or default_registry
    family, kind = int(sock.family), int(sock.type)
    names = reg.names("transport")
    ordered = [n for n in _BUILTIN_ORDER if n in names] + [n for n in names if n not in _BUILTIN_ORDER]
    for name in ordered:
        try:
            spec = reg.load("transport", name)
            if (reg.load("family", spec.family).address_family == family
                    and reg.load("socket_type", spec.socket_type).socket_type == kind):
                return str(name)
        except PluginLoadError:
            continue
    raise SocketMismatchError(
        f"no installed transport serves {describe_socket(family, kind)} sockets "
        f"(installed: {', '.join(names)})", family, kind, type(None),
    )


# --------------------------------------------------------------------------- sd_notify


def _notify_address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        return "\0" + address[1:]  # the abstract namespace
    if address.startswith("/"):
        return address
    return None  # unset, empty, or a kind this module does not speak (vsock:...)


def notify(message: str) -> bool:
    """Send *message* (``"READY=1"``, ``"WATCHDOG=1"``, newline-separated assignments) to
    the service manager at ``$NOTIFY_SOCKET``.

    :returns: True when it was sent; False when there is no notify socket (the variable
        is unset or not a path or ``@abstract`` name) or nobody receives on it. Never
        raises for a missing or dead receiver.
    """
    address = _notify_address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(NOTIFY_TIMEOUT)  # a full queue: give up rather than hang
            sock.sendto(message.encode("utf-8"), address)
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings the service manager asks of this process.

    As ``sd_watchdog_enabled``: ``WATCHDOG_USEC`` set (a positive number of
    microseconds) and ``WATCHDOG_PID`` unset or this process's pid; half the timeout, as
    its documentation recommends. None when no watchdog is asked for.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not _DIGITS.fullmatch(usec) or int(usec) == 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and (not _DIGITS.fullmatch(pid) or int(pid) != os.getpid()):
        return None
    return int(usec) / 2 / 1_000_000
