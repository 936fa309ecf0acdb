"""The standard library's own request handlers served by sockserve servers.

``http.server``, ``xmlrpc.server`` and ``wsgiref.simple_server`` build on
``socketserver``; their handlers must work unchanged on sockserve servers that add what
the standard server classes add. Clients are the standard ones (``urllib``,
``http.client``, ``xmlrpc.client``), talking over loopback.
"""

from __future__ import annotations

import functools
import http.client
import http.server
import json
import re
import socket
import threading
import urllib.error
import urllib.request
import wsgiref.simple_server
import wsgiref.validate
import xmlrpc.client
import xmlrpc.server

import pytest

import sockserve
from support import no_leaks, serving

TIMEOUT = 5.0

#: An opener that ignores any *_proxy environment variables: requests go to loopback.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch(url: str, data: bytes | None = None):
    return OPENER.open(url, data=data, timeout=TIMEOUT)


def url_of(server, path: str = "/") -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}{path}"


# ------------------------------------------------------------------ http.server


class HTTPOnSockserve(sockserve.ThreadingTCPServer):
    """What ``http.server.ThreadingHTTPServer`` adds to its base class, on sockserve."""

    allow_reuse_address = True
    daemon_threads = True

    def server_bind(self):
        # http.server.HTTPServer.server_bind, without naming the standard TCPServer.
        super().server_bind()
        host, port = self.server_address[:2]
        self.server_name = socket.getfqdn(host)
        self.server_port = port


@pytest.fixture
def site(tmp_path):
    (tmp_path / "hello.txt").write_bytes(b"hello from a file\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "page.html").write_bytes(b"<p>page</p>")
    return tmp_path


def test_simple_http_handler_serves_a_file_from_its_directory(site, capsys):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    with no_leaks():
        with serving(HTTPOnSockserve(("127.0.0.1", 0), handler)) as server:
            with fetch(url_of(server, "/hello.txt")) as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == "text/plain"
                assert response.headers["Content-Length"] == str(len(b"hello from a file\n"))
                assert response.read() == b"hello from a file\n"
            with fetch(url_of(server, "/sub/page.html")) as response:
                assert response.headers["Content-Type"] == "text/html"
                assert response.read() == b"<p>page</p>"
    # The handler's access log goes to stderr, as usual.
    assert re.search(r'"GET /hello.txt HTTP/1.1" 200 ', capsys.readouterr().err)


def test_simple_http_handler_lists_the_directory_and_answers_404(site, capsys):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    with serving(HTTPOnSockserve(("127.0.0.1", 0), handler)) as server:
        with fetch(url_of(server, "/")) as response:
            listing = response.read().decode()
        assert 'href="hello.txt"' in listing and 'href="sub/"' in listing
        with pytest.raises(urllib.error.HTTPError) as info:
            fetch(url_of(server, "/missing.txt"))
        assert info.value.code == 404
        info.value.close()
    assert '"GET /missing.txt HTTP/1.1" 404' in capsys.readouterr().err


class EchoHTTPHandler(http.server.BaseHTTPRequestHandler):
    """Replies with what it saw, over HTTP/1.1 keep-alive."""

    protocol_version = "HTTP/1.1"

    def reply(self, status: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):
        self.reply(
            200,
            {
                "path": self.path,
                "client_port": self.client_address[1],
                "thread": threading.current_thread().name,
            },
        )

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.reply(201, {"upper": body.decode().upper()})

    def log_message(self, format, *args):
        pass


def test_base_http_handler_subclass_answers_get_and_post():
    with serving(HTTPOnSockserve(("127.0.0.1", 0), EchoHTTPHandler)) as server:
        with fetch(url_of(server, "/a/b?c=d")) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/json"
            got = json.loads(response.read())
        assert got["path"] == "/a/b?c=d"
        assert got["thread"].endswith("(process_request_thread)")
        with fetch(url_of(server, "/post"), data=b"posted body") as response:
            assert response.status == 201
            assert json.loads(response.read()) == {"upper": "POSTED BODY"}


def test_keep_alive_serves_several_requests_on_one_connection_and_thread():
    with serving(HTTPOnSockserve(("127.0.0.1", 0), EchoHTTPHandler)) as server:
        host, port = server.server_address
        first = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        try:
            answers = []
            for i in range(3):
                first.request("GET", f"/{i}")
                response = first.getresponse()
                assert response.status == 200
                assert response.getheader("Connection") is None  # not closed
                answers.append(json.loads(response.read()))
            own_port = first.sock.getsockname()[1]
        finally:
            first.close()
        second = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        try:
            second.request("GET", "/other")
            other = json.loads(second.getresponse().read())
        finally:
            second.close()
    assert [a["path"] for a in answers] == ["/0", "/1", "/2"]
    assert {a["client_port"] for a in answers} == {own_port}
    assert len({a["thread"] for a in answers}) == 1, "one thread serves the connection"
    assert other["thread"] != answers[0]["thread"]


@pytest.mark.parametrize(
    "server_class",
    [HTTPOnSockserve, http.server.ThreadingHTTPServer],
    ids=["sockserve", "http.server"],
)
def test_server_close_does_not_wait_for_an_idle_keep_alive_connection(server_class):
    """daemon_threads=True: server_close waits for non-daemon threads only (as documented).

    http.server.ThreadingHTTPServer sets daemon_threads so that a browser holding a
    keep-alive connection open cannot stop the server from closing.
    """
    server = server_class(("127.0.0.1", 0), EchoHTTPHandler)
    loop = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    loop.start()
    host, port = server.server_address
    idle = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    closer = threading.Thread(target=server.server_close, daemon=True)
    try:
        idle.request("GET", "/")
        assert idle.getresponse().read()
        server.shutdown()
        loop.join(TIMEOUT)
        closer.start()
        closer.join(2.0)
        assert not closer.is_alive(), "server_close() waited for an idle keep-alive connection"
    finally:
        idle.close()  # ends the request thread, so a blocked server_close returns too
        server.shutdown()
        loop.join(TIMEOUT)
        if closer.ident is not None:
            closer.join(TIMEOUT)
        server.server_close()


# ------------------------------------------------------------------ xmlrpc.server


class XMLRPCOnSockserve(sockserve.TCPServer, xmlrpc.server.SimpleXMLRPCDispatcher):
    """``xmlrpc.server.SimpleXMLRPCServer``, with sockserve's TCPServer as the base."""

    allow_reuse_address = True
    _send_traceback_header = False

    def __init__(
        self,
        addr,
        requestHandler=xmlrpc.server.SimpleXMLRPCRequestHandler,
        logRequests=True,
        allow_none=False,
        encoding=None,
        bind_and_activate=True,
        use_builtin_types=False,
    ):
        self.logRequests = logRequests
        xmlrpc.server.SimpleXMLRPCDispatcher.__init__(self, allow_none, encoding, use_builtin_types)
        sockserve.TCPServer.__init__(self, addr, requestHandler, bind_and_activate)


class TimeoutTransport(xmlrpc.client.Transport):
    """An xmlrpc.client transport whose connections time out (no test may hang)."""

    def make_connection(self, host):
        connection = super().make_connection(host)
        connection.timeout = TIMEOUT
        return connection


def divide(a, b):
    return a / b


@pytest.fixture
def rpc_server():
    server = XMLRPCOnSockserve(("127.0.0.1", 0), logRequests=False, allow_none=True)
    server.register_introspection_functions()
    server.register_multicall_functions()
    server.register_function(pow)
    server.register_function(divide)
    server.register_function(lambda *words: " ".join(words).upper(), "shout")
    with serving(server):
        yield server


def proxy_for(server, path: str = "/RPC2"):
    return xmlrpc.client.ServerProxy(
        url_of(server, path), transport=TimeoutTransport(), allow_none=True
    )


def test_xmlrpc_calls_registered_functions(rpc_server):
    with proxy_for(rpc_server) as proxy:
        assert proxy.pow(2, 10) == 1024
        assert proxy.shout("over", "sockserve") == "OVER SOCKSERVE"
        assert proxy.divide(7, 2) == 3.5
        assert set(proxy.system.listMethods()) >= {"pow", "divide", "shout", "system.multicall"}


def test_xmlrpc_multicall_runs_every_call(rpc_server):
    with proxy_for(rpc_server) as proxy:
        multi = xmlrpc.client.MultiCall(proxy)
        multi.pow(3, 2)
        multi.shout("a", "b")
        assert tuple(multi()) == (9, "A B")


def test_xmlrpc_errors_come_back_as_faults(rpc_server):
    with proxy_for(rpc_server) as proxy:
        with pytest.raises(xmlrpc.client.Fault) as info:
            proxy.divide(1, 0)
        assert info.value.faultString == "<class 'ZeroDivisionError'>:division by zero"
        with pytest.raises(xmlrpc.client.Fault) as info:
            proxy.nope()
        assert info.value.faultString == '<class \'Exception\'>:method "nope" is not supported'
        # The server keeps serving after faults.
        assert proxy.pow(2, 3) == 8


def test_xmlrpc_paths_outside_rpc_paths_get_404(rpc_server):
    with proxy_for(rpc_server, "/elsewhere") as proxy:
        with pytest.raises(xmlrpc.client.ProtocolError) as info:
            proxy.pow(2, 2)
    assert info.value.errcode == 404


# ------------------------------------------------------------------ wsgiref


class WSGIServerOnSockserve(sockserve.TCPServer):
    """``wsgiref.simple_server.WSGIServer``, with sockserve's TCPServer as the base.

    WSGIServer derives from http.server.HTTPServer, whose ``server_bind`` calls the
    standard ``socketserver.TCPServer.server_bind`` by name, so inheriting from it would
    bind with the standard module. Instead this does HTTPServer's bookkeeping itself and
    borrows WSGIServer's own methods, which only use the server's attributes.
    """

    allow_reuse_address = True
    application = None

    def server_bind(self):
        super().server_bind()
        host, port = self.server_address[:2]
        self.server_name = socket.getfqdn(host)
        self.server_port = port
        self.setup_environ()

    setup_environ = wsgiref.simple_server.WSGIServer.setup_environ
    get_app = wsgiref.simple_server.WSGIServer.get_app
    set_app = wsgiref.simple_server.WSGIServer.set_app


ENVIRON_KEYS = (
    "REQUEST_METHOD",
    "PATH_INFO",
    "QUERY_STRING",
    "SERVER_NAME",
    "SERVER_PORT",
    "SERVER_PROTOCOL",
    "REMOTE_ADDR",
    "CONTENT_LENGTH",
    "wsgi.url_scheme",
    "wsgi.multithread",
    "wsgi.multiprocess",
)


def environ_app(environ, start_response):
    """A small WSGI app: replies with parts of its environ and the request body, as JSON."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    payload = json.dumps(
        {
            "environ": {key: environ.get(key) for key in ENVIRON_KEYS},
            "software": environ["SERVER_SOFTWARE"],
            "body": body.decode(),
        }
    ).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("X-App", "environ")])
    return [payload]


class QuietWSGIHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format, *args):
        pass


def wsgi_exchange(server_class):
    """Serve environ_app with make_server(server_class=...) and make a GET and a POST."""
    app = wsgiref.validate.validator(environ_app)  # fails the request on any WSGI violation
    server = wsgiref.simple_server.make_server(
        "127.0.0.1", 0, app, server_class=server_class, handler_class=QuietWSGIHandler
    )
    with serving(server):
        with fetch(url_of(server, "/path/to?q=1&r=2")) as response:
            assert response.status == 200
            assert response.headers["X-App"] == "environ"
            got = json.loads(response.read())
        with fetch(url_of(server, "/submit"), data=b"form=data") as response:
            posted = json.loads(response.read())
    return server, got, posted


def test_wsgi_app_is_served_through_make_server_with_a_sockserve_server_class():
    with no_leaks():
        server, got, posted = wsgi_exchange(WSGIServerOnSockserve)
    port = server.server_address[1]
    assert got["environ"] == {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/path/to",
        "QUERY_STRING": "q=1&r=2",
        "SERVER_NAME": socket.getfqdn("127.0.0.1"),
        "SERVER_PORT": str(port),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_LENGTH": "",
        "wsgi.url_scheme": "http",
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
    }
    assert got["software"].startswith("WSGIServer/")
    assert posted["environ"]["REQUEST_METHOD"] == "POST"
    assert posted["environ"]["CONTENT_LENGTH"] == str(len(b"form=data"))
    assert posted["body"] == "form=data"


def test_wsgi_environ_matches_the_standard_wsgi_server():
    _, ours, our_post = wsgi_exchange(WSGIServerOnSockserve)
    _, theirs, their_post = wsgi_exchange(wsgiref.simple_server.WSGIServer)
    for got in (ours, theirs, our_post, their_post):
        del got["environ"]["SERVER_PORT"]  # each server has its own port
    assert ours == theirs
    assert our_post == their_post
