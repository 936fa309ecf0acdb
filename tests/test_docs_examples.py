"""The standard library documentation's socketserver examples, run on sockserve.

The handler and server classes below are the examples from the ``socketserver``
documentation (section "Examples") with only the import changed. What had to change to run
them as tests is marked ``# test:``: binding to 127.0.0.1 port 0 instead of
localhost:9999, and running ``serve_forever`` in a thread so the client can run here.
"""

from __future__ import annotations

import os
import re
import socket
import threading

import sockserve as socketserver
from support import no_leaks, requires_fork, serving

HOST, PORT = "127.0.0.1", 0  # test: the docs use "localhost", 9999
TIMEOUT = 5.0


# ------------------------------------------------------------------ socketserver.TCPServer Example


class MyTCPHandler(socketserver.BaseRequestHandler):
    """
    The request handler class for our server.

    It is instantiated once per connection to the server, and must
    override the handle() method to implement communication to the
    client.
    """

    def handle(self):
        # self.request is the TCP socket connected to the client
        self.data = self.request.recv(1024).strip()
        print("{} wrote:".format(self.client_address[0]))
        print(self.data)
        # just send back the same data, but upper-cased
        self.request.sendall(self.data.upper())


class MyStreamTCPHandler(socketserver.StreamRequestHandler):  # docs: also MyTCPHandler
    def handle(self):
        # self.rfile is a file-like object created by the handler;
        # we can now use e.g. readline() instead of raw recv() calls
        self.data = self.rfile.readline().strip()
        print("{} wrote:".format(self.client_address[0]))
        print(self.data)
        # Likewise, self.wfile is a file-like object used to write back
        # to the client
        self.wfile.write(self.data.upper())


def tcp_example_client(address, data):
    """The documentation's TCP client."""
    # Create a socket (SOCK_STREAM means a TCP socket)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)  # test: no test may hang
        # Connect to server and send data
        sock.connect(address)
        sock.sendall(bytes(data + "\n", "utf-8"))

        # Receive data from the server and shut down
        received = str(sock.recv(1024), "utf-8")

    print("Sent:     {}".format(data))
    print("Received: {}".format(received))
    return received


def test_tcp_server_example_upper_cases_what_the_client_sent(capsys):
    # Create the server, binding to localhost on port 9999
    with socketserver.TCPServer((HOST, PORT), MyTCPHandler) as server:
        with serving(server):  # test: the docs call server.serve_forever() here
            received = tcp_example_client(server.server_address, "hello world and more")
    assert received == "HELLO WORLD AND MORE"
    out = capsys.readouterr().out
    assert "127.0.0.1 wrote:\nb'hello world and more'\n" in out
    assert "Sent:     hello world and more\nReceived: HELLO WORLD AND MORE\n" in out


def test_tcp_server_example_with_stream_request_handler(capsys):
    with socketserver.TCPServer((HOST, PORT), MyStreamTCPHandler) as server:
        with serving(server):
            received = tcp_example_client(server.server_address, "one line")
            again = tcp_example_client(server.server_address, "another line")
    assert (received, again) == ("ONE LINE", "ANOTHER LINE")
    out = capsys.readouterr().out
    assert out.count("127.0.0.1 wrote:\n") == 2
    assert "b'one line'\n" in out and "b'another line'\n" in out


# ------------------------------------------------------------------ socketserver.UDPServer Example


class MyUDPHandler(socketserver.BaseRequestHandler):
    """
    This class works similar to the TCP handler class, except that
    self.request consists of a pair of data and client socket, and since
    there is no connection the client address must be given explicitly
    when sending data back via sendto().
    """

    def handle(self):
        data = self.request[0].strip()
        socket = self.request[1]
        print("{} wrote:".format(self.client_address[0]))
        print(data)
        socket.sendto(data.upper(), self.client_address)


def test_udp_server_example_upper_cases_the_datagram(capsys):
    with socketserver.UDPServer((HOST, PORT), MyUDPHandler) as server:
        with serving(server):
            data = "hello datagram"
            # SOCK_DGRAM is the socket type to use for UDP sockets
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(TIMEOUT)  # test: no test may hang
                # As you can see, there is no connect() call; UDP has no connections.
                # Instead, data is directly sent to the recipient via sendto().
                sock.sendto(bytes(data + "\n", "utf-8"), server.server_address)
                received = str(sock.recv(1024), "utf-8")
    assert received == "HELLO DATAGRAM"
    assert "127.0.0.1 wrote:\nb'hello datagram'\n" in capsys.readouterr().out


# ------------------------------------------------------------------ Asynchronous Mixins


class ThreadedTCPRequestHandler(socketserver.BaseRequestHandler):
    def handle(self):
        data = str(self.request.recv(1024), "ascii")
        cur_thread = threading.current_thread()
        response = bytes("{}: {}".format(cur_thread.name, data), "ascii")
        self.request.sendall(response)


class ThreadedTCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    pass


def client(ip, port, message):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)  # test: no test may hang
        sock.connect((ip, port))
        sock.sendall(bytes(message, "ascii"))
        response = str(sock.recv(1024), "ascii")
        print("Received: {}".format(response))
        return response  # test: returned to check it


def test_threading_mixin_example_answers_from_a_thread_per_request(capsys):
    with no_leaks():
        server = ThreadedTCPServer((HOST, PORT), ThreadedTCPRequestHandler)
        with server:
            ip, port = server.server_address

            # Start a thread with the server -- that thread will then start one
            # more thread for each request
            server_thread = threading.Thread(target=server.serve_forever)
            # Exit the server thread when the main thread terminates
            server_thread.daemon = True
            server_thread.start()
            print("Server loop running in thread:", server_thread.name)

            responses = [
                client(ip, port, "Hello World 1"),
                client(ip, port, "Hello World 2"),
                client(ip, port, "Hello World 3"),
            ]

            server.shutdown()
        server_thread.join(TIMEOUT)  # test: leave nothing running
        assert not server_thread.is_alive()

    # The documented output: "Received: Thread-2 (process_request_thread): Hello World 1"
    names = []
    for number, response in enumerate(responses, 1):
        match = re.fullmatch(r"(Thread-\d+ \(process_request_thread\)): Hello World (\d)", response)
        assert match, response
        assert match.group(2) == str(number)
        names.append(match.group(1))
    assert len(set(names)) == 3, "each request gets its own thread"
    assert server_thread.name not in names
    out = capsys.readouterr().out
    assert f"Server loop running in thread: {server_thread.name}\n" in out
    assert out.count("Received: Thread-") == 3


# ------------------------------------------------------------------ hand-written compositions


def test_hand_written_threading_udp_server_handles_datagrams_in_threads():
    class S(socketserver.ThreadingMixIn, socketserver.UDPServer):
        pass

    class ThreadName(socketserver.BaseRequestHandler):
        def handle(self):
            data, sock = self.request
            name = threading.current_thread().name
            sock.sendto(data + b" from " + name.encode(), self.client_address)

    assert S.__mro__.index(socketserver.ThreadingMixIn) < S.__mro__.index(socketserver.UDPServer)
    with no_leaks():
        with S((HOST, PORT), ThreadName) as server:
            with serving(server) as server:
                replies = []
                for i in range(3):
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                        sock.settimeout(TIMEOUT)
                        sock.sendto(b"d%d" % i, server.server_address)
                        replies.append(sock.recv(1024).decode())
    for i, reply in enumerate(replies):
        assert re.fullmatch(rf"d{i} from Thread-\d+ \(process_request_thread\)", reply), reply
    assert len(set(replies)) == 3


@requires_fork
def test_hand_written_forking_tcp_server_handles_connections_in_children():
    class S(socketserver.ForkingMixIn, socketserver.TCPServer):
        pass

    class Pid(socketserver.BaseRequestHandler):
        def handle(self):
            data = self.request.recv(1024)
            self.request.sendall(b"%s from %d" % (data, os.getpid()))

    assert S.__mro__.index(socketserver.ForkingMixIn) < S.__mro__.index(socketserver.TCPServer)
    with no_leaks():
        with S((HOST, PORT), Pid) as server:
            with serving(server) as server:
                pids = []
                for i in range(3):
                    with socket.create_connection(server.server_address, TIMEOUT) as sock:
                        sock.sendall(b"c%d" % i)
                        sock.shutdown(socket.SHUT_WR)
                        data, _, pid = sock.recv(1024).partition(b" from ")
                        assert data == b"c%d" % i
                        pids.append(int(pid))
    assert os.getpid() not in pids
    assert len(set(pids)) == 3, "each connection gets its own child"
