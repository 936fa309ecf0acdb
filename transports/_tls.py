"""The ``tls`` layer: TLS on any stream transport, handshaken in the worker with a deadline.

What belongs here: ``TLSLayer`` (a layer per DESIGN.md section 6) and its options
(``TLSOptions``), the ``SSLContext`` it builds from certificate files (per SNI name too),
the handshake with its deadline and its failures sorted into reasons, close_notify at close,
``reload()``, and ``tls_options_from_flags`` for the ``--tls-cert`` command-line flags.

The listening socket is never wrapped: the serving thread only accepts. Each connection is
wrapped in ``prepare_request`` (in the thread or process that will run the request) and
handshaken there within ``handshake_timeout`` seconds in all, however slowly the client
sends. The handler's ``self.request`` is a ``TLSSocket`` (an ``ssl.SSLSocket``):
``getpeercert()``, ``selected_alpn_protocol()``, ``version()`` work, and ``sni`` holds
the server name the client asked for (None when it sent none).

One module of more than 400 lines: the options, the contexts they build and the handshake
that uses them are one feature, read together; ``tls_options_from_flags`` is the command
line's view of the same options.
"""

from __future__ import annotations

import logging
import re
import select
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from ..core._errors import LayerError, OptionError
from ..core._options import (
    any_of,
    check_options,
    choice,
    declare_options,
    exclusive,
    flag,
    option,
    option_check,
    positive,
    python_object,
    requires,
    text,
)

if TYPE_CHECKING:  # what type checkers see under the mixin: the server it is composed over
    from ..core import BaseServer as _ServerClass
else:
    _ServerClass = object

__all__ = ["TLSLayer", "TLSOptions", "TLSSocket", "tls_options_from_flags"]

log = logging.getLogger("sockserve.tls")

#: Seconds a client has for the whole handshake by default.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds closing may wait to hand close_notify to a peer whose receive window is full.
#: The peer's own close_notify is never waited for.
CLOSE_NOTIFY_TIMEOUT = 0.5

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
#: The TLS record type of a handshake message: the first byte a TLS client sends.
_HANDSHAKE_RECORD = 0x16
_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_HTTP_METHODS = (b"GET ", b"POST ", b"HEAD ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ",
                 b"CONNECT ", b"TRACE ", b"PRI ")
_VERSION_REASONS = frozenset({
    "UNSUPPORTED_PROTOCOL", "WRONG_SSL_VERSION", "VERSION_TOO_LOW", "NO_PROTOCOLS_AVAILABLE",
    "TLSV1_ALERT_PROTOCOL_VERSION", "WRONG_VERSION_NUMBER", "NO_SHARED_CIPHER",
})
_CERT_REASONS = frozenset({
    "CERTIFICATE_VERIFY_FAILED", "PEER_DID_NOT_RETURN_A_CERTIFICATE", "NO_CERTIFICATE_RETURNED",
})
#: Alerts with which a client rejects the server's certificate.
_CLIENT_REJECTS = frozenset({
    "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED", "TLSV1_ALERT_ACCESS_DENIED",
})
_SSL_C = re.compile(r"\s*\(_ssl\.c:\d+\)")


class TLSSocket(ssl.SSLSocket):
    """The connection a ``tls`` server's handler gets: an ``ssl.SSLSocket`` that also says
    which server name the client asked for (``sni``) and whether the handshake is done."""

    #: The server name (SNI) the client sent, lower-cased; None when it sent none.
    sni: str | None = None
    #: The handshake completed (closing then sends close_notify).
    established: bool = False
    #: Seconds the layer's handshake took once it completed: from the layer's start (the
    #: wait for the ClientHello included, as ``handshake_timeout`` counts it) to the end of
    #: ``do_handshake()``; None before. The ``stats`` plugin's handshake histogram.
    handshake_time: float | None = None


# --------------------------------------------------------------------------- options


def _check_alpn(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not _alpn_list(value):
        raise ValueError(f"'{attribute.name}' must be protocol names, comma-separated or a list "
                         f"(got {value!r})")


def _check_sni(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        _sni_map(value)  # raises ValueError saying what is wrong


def _alpn_list(value: Any) -> list[str]:
    """``"h2,http/1.1"`` or ``["h2", "http/1.1"]`` as a list; [] when malformed."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, Sequence) or isinstance(names, bytes):
        return []
    names = [n.strip() if isinstance(n, str) else n for n in names]
    if not names or not all(isinstance(n, str) and 0 < len(n.encode()) < 256 for n in names):
        return []
    return names


def _sni_map(value: Any) -> dict[str, tuple[str, str | None]]:
    """The ``sni`` option as name -> (certfile, keyfile or None).

    Text: ``name=cert[:key],name=cert[:key]``; Python: a mapping of name to ``"cert[:key]"``
    or to a ``(cert, key)`` pair.
    """
    if isinstance(value, str):
        items = []
        for part in filter(None, (p.strip() for p in value.split(","))):
            name, sep, files = part.partition("=")
            if not sep:
                raise ValueError(f"'sni' entry {part!r} is not name=certfile[:keyfile]")
            items.append((name, files))
    elif isinstance(value, Mapping):
        items = list(value.items())
    else:
        raise ValueError(f"'sni' must be name=certfile[:keyfile],... or a mapping (got {value!r})")
    found: dict[str, tuple[str, str | None]] = {}
    for name, files in items:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"'sni' has an empty or non-text server name: {name!r}")
        if isinstance(files, str):
            cert, _, key = files.strip().partition(":")
            pair: tuple[Any, Any] = (cert, key or None)
        elif isinstance(files, (tuple, list)) and len(files) == 2:
            pair = (files[0], files[1])
        else:
            raise ValueError(f"'sni' entry for {name!r} must be 'certfile[:keyfile]' (got {files!r})")
        if not (isinstance(pair[0], str) and pair[0]) or not (pair[1] is None or isinstance(pair[1], str)):
            raise ValueError(f"'sni' entry for {name!r} names no certificate file: {files!r}")
        found[name.strip().lower()] = pair
    if not found:
        raise ValueError("'sni' names no server")
    return found


@attrs.define
class TLSOptions:
    """Options of the ``tls`` layer."""

    #: PEM file with the server's certificate chain (and its key, unless ``keyfile``).
    certfile: str | None = text(optional=True, default=None)
    #: PEM file with the private key; None: it is in ``certfile``.
    keyfile: str | None = text(optional=True, default=None)
    #: File whose first line is the password of an encrypted key.
    password_file: str | None = text(optional=True, default=None)
    #: PEM file of the CAs that client certificates must chain to.
    cafile: str | None = text(optional=True, default=None)
    #: Ask for client certificates: none, optional (verified when sent), required.
    verify_client: str = choice("none", "optional", "required", default="none")
    #: ALPN protocols offered, most preferred first ("h2,http/1.1" or a list).
    alpn_protocols: str | list[str] | None = option(_check_alpn, default=None)
    #: Close connections whose client shares no ALPN protocol (reason ``tls-alpn``).
    alpn_required: bool = flag(default=False)
    #: Other certificates by server name: ``example.com=/a.pem,*.example.org=/b.pem:/b.key``.
    sni: str | dict[str, Any] | None = option(_check_sni, default=None)
    #: Lowest TLS version accepted: 1.2 or 1.3.
    min_version: str = choice("1.2", "1.3", default="1.2")
    #: Seconds the whole handshake may take, waiting for the first byte included (> 0).
    handshake_timeout: float = option(
        attrs.validators.and_(attrs.validators.instance_of((int, float)), positive),
        default=HANDSHAKE_TIMEOUT)
    #: A ready server-side SSLContext instead of the files (Python only). The layer sets
    #: its ``sslsocket_class`` and ``sni_callback`` (calling the one it had after its own);
    #: ``reload()`` keeps it as it is.
    ssl_context: ssl.SSLContext | None = python_object(ssl.SSLContext)

    sockserve_checks = (
        any_of("certfile", "ssl_context"),
        exclusive("certfile", "ssl_context"),
        exclusive("cafile", "ssl_context"),
        requires("keyfile", "certfile"),
        requires("password_file", "certfile"),
        requires("sni", "certfile"),
        option_check("verify_client", "cafile", test=lambda verify_client, cafile: (
            verify_client in (None, "none") or cafile is not None),
            message="option verify_client={verify_client!r} needs option cafile (the CAs "
                    "client certificates must chain to)"),
        option_check("alpn_required", "alpn_protocols", "ssl_context",
                     test=lambda alpn_required, alpn_protocols, ssl_context: (
                         not alpn_required or alpn_protocols is not None or ssl_context is not None),
                     message="option alpn_required needs option alpn_protocols"),
    )


def tls_options_from_flags(
    cert: str | None, key: str | None = None, password_file: str | None = None
) -> dict[str, str]:
    """The ``tls`` options ``sockserve serve --tls-cert F --tls-key F --tls-password-file F``
    set (the flags of the standard ``http.server``); {} when none is given.

    :raises OptionError: ``--tls-key`` or ``--tls-password-file`` without ``--tls-cert``.
    """
    if cert is None:
        for given, name, flagname in ((key, "keyfile", "--tls-key"),
                                      (password_file, "password_file", "--tls-password-file")):
            if given is not None:
                raise OptionError(name, given, f"{flagname} needs --tls-cert")
        return {}
    found = {"certfile": cert, "keyfile": key, "password_file": password_file}
    return {name: value for name, value in found.items() if value is not None}


# --------------------------------------------------------------------------- contexts


def _read(option_name: str, path: str, what: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError as exc:
        raise OptionError(option_name, path, f"cannot read the {what}: {exc.strerror or exc}") from exc


def _no_password() -> str:
    raise ValueError("the key is encrypted and no password_file is set")


def _load_chain(context: ssl.SSLContext, where: str, cert: str, key: str | None,
                password: str | None) -> None:
    """Load *cert* and *key* into *context*; every failure an OptionError naming the file."""
    if "-----BEGIN CERTIFICATE-----" not in _read(where, cert, "certificate file"):
        raise OptionError(where, cert, "no PEM certificate (-----BEGIN CERTIFICATE-----) in it")
    try:
        ssl.create_default_context(cafile=cert)  # parses every certificate in the file
    except ssl.SSLError as exc:
        raise OptionError(where, cert, f"not a valid PEM certificate: {_said(exc)}") from exc
    key_where, key_path = (where if key is None else "keyfile", cert if key is None else key)
    if "PRIVATE KEY-----" not in _read(key_where, key_path, "key file"):
        raise OptionError(key_where, key_path, "no PEM private key (-----BEGIN ... PRIVATE KEY-----) in it")
    try:
        context.load_cert_chain(cert, key, password=_no_password if password is None else password)
    except ValueError as exc:  # from _no_password
        raise OptionError(key_where, key_path, str(exc)) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            problem = f"the private key does not match the certificate in {cert}"
        elif password is not None:
            problem = f"cannot load the private key: wrong password in password_file, or a bad key ({_said(exc)})"
        else:
            problem = f"cannot load the private key: {_said(exc)}"
        raise OptionError(key_where, key_path, problem) from exc
    except OSError as exc:
        raise OptionError(key_where, key_path, f"cannot load the private key: {exc}") from exc


def _said(exc: BaseException) -> str:
    return _SSL_C.sub("", str(exc))


@attrs.frozen
class _Contexts:
    """One generation of contexts: swapped as a whole by ``reload()``."""

    context: ssl.SSLContext
    by_name: dict[str, ssl.SSLContext]


def _record_sni(by_name: dict[str, ssl.SSLContext], chained: Any) -> Any:
    def choose(sock: Any, name: str | None, context: ssl.SSLContext) -> Any:
        if name:
            name = name.lower()
            if isinstance(sock, TLSSocket):
                sock.sni = name
            chosen = by_name.get(name)
            if chosen is None and "." in name:
                chosen = by_name.get("*." + name.split(".", 1)[1])
            if chosen is not None:
                sock.context = chosen
        return chained(sock, name, context) if chained is not None else None

    choose.chained = chained  # type: ignore[attr-defined]
    return choose


# --------------------------------------------------------------------------- the layer


def _refuse_datagrams(cls: type) -> None:
    if getattr(cls, "socket_type", None) == socket.SOCK_DGRAM:
        raise TypeError(f"{cls.__name__}: the tls layer needs a stream transport (tcp, tcp6, "
                        "unix); this is a datagram server, which has no connection to wrap "
                        "(DTLS is not supported)")


@declare_options(TLSOptions)
class TLSLayer(_ServerClass):
    """The ``tls`` layer: ``compose("tcp", "threadpool", layers=[TLSLayer], options={"certfile":
    "server.pem"})``.

    The contexts are built when the server is constructed: a bad certificate, key or
    password raises ``OptionError`` naming the option and the file, before anything is
    bound. A failed handshake raises ``LayerError`` with one of the reasons ``tls-timeout``,
    ``tls-http`` (plain HTTP on the TLS port), ``tls-version``, ``tls-eof``,
    ``tls-certificate`` (a client certificate rejected, or the client rejecting ours),
    ``tls-alpn`` (``alpn_required`` and no protocol in common) or ``tls-handshake``.
    """

    # Options (TLSOptions declares them and their defaults).
    certfile: str | None
    keyfile: str | None
    password_file: str | None
    cafile: str | None
    verify_client: str
    alpn_protocols: str | list[str] | None
    alpn_required: bool
    sni: str | dict[str, Any] | None
    min_version: str
    handshake_timeout: float
    ssl_context: ssl.SSLContext | None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _refuse_datagrams(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _refuse_datagrams(type(self))
        check_options(self)  # before the files are read, as BaseServer would
        #: The contexts new connections are wrapped with (``reload()`` replaces them).
        self.tls_contexts = self._tls_build()
        super().__init__(*args, **kwargs)

    # -- contexts

    def _tls_context(self, where: str, cert: str, key: str | None, password: str | None) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = _VERSIONS[self.min_version]
        context.verify_mode = _VERIFY[self.verify_client]
        if self.cafile is not None:
            _read("cafile", self.cafile, "CA file")
            try:
                context.load_verify_locations(cafile=self.cafile)
            except ssl.SSLError as exc:
                raise OptionError("cafile", self.cafile, f"no valid PEM certificate: {_said(exc)}") from exc
        if self.alpn_protocols is not None:
            context.set_alpn_protocols(_alpn_list(self.alpn_protocols))
        _load_chain(context, where, cert, key, password)
        context.sslsocket_class = TLSSocket
        return context

    def _tls_build(self) -> _Contexts:
        """Build the contexts from the options and files.

        :raises OptionError: a file is missing or bad; the message names it.
        """
        if self.ssl_context is not None:
            context = self.ssl_context
            if context.protocol == ssl.PROTOCOL_TLS_CLIENT:
                raise OptionError("ssl_context", context, "a client-side context (PROTOCOL_TLS_CLIENT); "
                                  "the server needs PROTOCOL_TLS_SERVER")
            context.sslsocket_class = TLSSocket
            chained = context.sni_callback  # the user's own, kept and called after ours
            context.sni_callback = _record_sni({}, getattr(chained, "chained", chained))
            return _Contexts(context, {})
        password = None
        if self.password_file is not None:
            password = _read("password_file", self.password_file, "password file").partition("\n")[0].rstrip("\r")
        assert self.certfile is not None  # check_options: certfile or ssl_context
        context = self._tls_context("certfile", self.certfile, self.keyfile, password)
        by_name = {name: self._tls_context("sni", cert, key, password)
                   for name, (cert, key) in (_sni_map(self.sni) if self.sni is not None else {}).items()}
        context.sni_callback = _record_sni(by_name, None)
        return _Contexts(context, by_name)

    def reload(self) -> bool:
        """Build new contexts from the files and use them for new connections (those in
        flight keep theirs). Bad new files keep the old contexts and log one error line.
        A given ``ssl_context`` is kept as it is.

        :returns: False when something kept its old state (here or further down the chain).
        """
        done = super().reload()
        if self.ssl_context is not None:
            return done
        try:
            contexts = self._tls_build()
        except OptionError as exc:
            log.error("%s: tls reload failed, keeping the certificates loaded before: %s",
                      type(self).__name__, exc)
            return False
        self.tls_contexts = contexts
        log.info("%s: tls certificates reloaded", type(self).__name__)
        return done

    # -- per connection

    def prepare_request(self, request: Any, client_address: Any) -> tuple[Any, Any]:
        """Wrap the connection and handshake within ``handshake_timeout``; return the
        ``TLSSocket``.

        :raises LayerError: the handshake failed (reasons in the class docstring).
        """
        request, client_address = super().prepare_request(request, client_address)
        if isinstance(request, tuple):
            return request, client_address
        limit = self.handshake_timeout
        started = time.monotonic()
        deadline = started + limit
        previous = request.gettimeout()
        _check_first_bytes(request, client_address, limit)
        if request.family in _TCP_FAMILIES:
            # TLS 1.3 sends its session tickets after the handshake: with Nagle on, the
            # handler's first small write then waits for their ACK (a delayed ACK, ~40 ms).
            # The TLS layer writes whole records, so nothing is gained by holding them.
            try:
                request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        try:
            tls = self.tls_contexts.context.wrap_socket(
                request, server_side=True, do_handshake_on_connect=False)
        except OSError as exc:  # gone between the peek and the wrap ("Closed before TLS ...")
            raise LayerError("tls-eof", client_address,
                             f"connection lost before the handshake: {exc}") from None
        try:
            # The socket's timeout bounds the whole do_handshake() call, not each step
            # (Python 3.5+): a client sending a byte at a time cannot stretch it.
            tls.settimeout(max(deadline - time.monotonic(), 0.001))
            tls.do_handshake()
        except OSError as exc:
            reason, detail = _classify(exc, limit)
            raise LayerError(reason, client_address, detail, request=tls) from None
        if isinstance(tls, TLSSocket):
            tls.established = True
            tls.handshake_time = time.monotonic() - started
        tls.settimeout(previous)
        if self.alpn_required and tls.selected_alpn_protocol() is None:
            raise LayerError("tls-alpn", client_address, "no ALPN protocol in common with the client",
                             request=tls)
        return tls, client_address

    def shutdown_request(self, request: Any) -> None:
        """Send close_notify (never waiting for the peer's), then shut down and close."""
        if isinstance(request, ssl.SSLSocket) and getattr(request, "established", True):
            _send_close_notify(request)
        super().shutdown_request(request)


def _check_first_bytes(sock: socket.socket, peer: Any, limit: float) -> None:
    """Wait (at most *limit* seconds) for the client's first bytes; refuse what is not TLS."""
    sock.settimeout(limit)
    try:
        head = sock.recv(8, socket.MSG_PEEK)
    except TimeoutError:
        raise LayerError("tls-timeout", peer, f"no ClientHello within {limit}s") from None
    except OSError as exc:
        raise LayerError("tls-eof", peer, f"connection lost before the handshake: {exc}") from None
    if not head:
        raise LayerError("tls-eof", peer, "the client closed the connection before the handshake")
    if head[0] != _HANDSHAKE_RECORD:
        if any(m.startswith(head) or head.startswith(m) for m in _HTTP_METHODS):
            raise LayerError("tls-http", peer, f"plain HTTP on the TLS port ({head!r})")
        raise LayerError("tls-handshake", peer, f"not a TLS handshake (first bytes {head!r})")


def _classify(exc: OSError, limit: float) -> tuple[str, str]:
    """A failed handshake's reason and detail."""
    if isinstance(exc, TimeoutError):
        return "tls-timeout", f"handshake not done within {limit}s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "tls-certificate", f"client certificate rejected: {exc.verify_message}"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError)):
        return "tls-eof", f"the client went away during the handshake: {_said(exc)}"
    reason = getattr(exc, "reason", None)
    if reason in _CERT_REASONS:
        return "tls-certificate", f"client certificate rejected: {_said(exc)}"
    if reason in _CLIENT_REJECTS:
        return "tls-certificate", f"the client rejected the server's certificate: {_said(exc)}"
    if reason in _VERSION_REASONS:
        return "tls-version", _said(exc)
    if reason in ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST"):
        return "tls-http", "plain HTTP on the TLS port"
    return "tls-handshake", _said(exc)


def _send_close_notify(sock: ssl.SSLSocket) -> None:
    """Hand close_notify to the peer; wait only for room to send it, never for its reply."""
    deadline = time.monotonic() + CLOSE_NOTIFY_TIMEOUT
    try:
        sock.settimeout(0.0)
        while True:
            try:
                sock.unwrap()
                return
            except ssl.SSLWantReadError:
                return  # sent; the peer's close_notify is not waited for
            except ssl.SSLWantWriteError:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([], [sock], [], left)[1]:
                    return
    except (OSError, ValueError):
        return  # reset, closed already, or cut off (no SSL state left)
