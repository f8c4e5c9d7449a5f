"""Slowloris and friends against the origin's HTTP server and the tracker (cluster.httpserver):
real servers on loopback, real sockets holding half-open requests, dripping headers, reading
slowly, and more connections than the server takes."""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

import pytest

from catalogue.serve import make_server
from cluster.httpserver import ServerLimits, SiteHTTPServer
from imagedist.tracker import PeerTable, Tracker
from tests.polling import wait_for

FAST = ServerLimits(header_timeout=1.0, request_timeout=1.0, max_connections=32, max_per_client=32)


@dataclass
class Running:
    server: SiteHTTPServer
    port: int
    path: str  # a path the server answers with 200
    stop: Callable[[], None]


def start(kind: str, root, limits: ServerLimits) -> Running:
    if kind == "origin":
        server = make_server(root, limits=limits)
        threading.Thread(target=server.serve_forever, daemon=True).start()

        def stop():
            server.shutdown()
            server.server_close()
        return Running(server, server.server_address[1], "/index.yaml", stop)
    tracker = Tracker("127.0.0.1", 0, PeerTable(), origin_port=6881, limits=limits).start()
    return Running(tracker.server, tracker.port, "/announce", tracker.stop)


@pytest.fixture(params=["origin", "tracker"])
def served(request, signed_catalogue):
    """Starts the origin or the tracker with the limits a test passes; stops whatever it started."""
    running: list[Running] = []

    def run(limits: ServerLimits = FAST) -> Running:
        running.append(start(request.param, signed_catalogue.cat.root, limits))
        return running[-1]
    yield run
    for r in running:
        r.stop()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return s


def status_of(port: int, path: str, source: str = "127.0.0.1") -> int:
    with connect(port, source) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return int(s.recv(64).split(b" ")[1])


def closed_by_server(s: socket.socket) -> bool:
    """True once the server has closed `s` (EOF or reset), False while it still holds it."""
    s.settimeout(0.05)
    try:
        return s.recv(4096) == b""
    except socket.timeout:
        return False
    except ConnectionError:
        return True


def test_half_open_requests_are_dropped_while_others_are_answered(served):
    r = served()
    held = [connect(r.port) for _ in range(20)]
    try:
        for s in held:
            s.sendall(b"GET /index.yaml HTT")  # never finished
        wait_for(lambda: r.server.active_connections == 20, 10, "r.server.active_connections == 20", interval=0.05)
        assert status_of(r.port, r.path) == 200  # the server still answers
        wait_for(lambda: all(closed_by_server(s) for s in held), 15, "all(closed_by_server(s) for s in held)", interval=0.05)
        wait_for(lambda: r.server.active_connections == 0, 10, "r.server.active_connections == 0", interval=0.05)
    finally:
        for s in held:
            s.close()


def test_dripped_headers_are_cut_off_although_each_byte_is_in_time(served):
    """One byte every 0.1 s keeps each read far inside the per-read timeout (1 s); the deadline
    for the whole header still ends the connection long before the 20 s the drip would take."""
    r = served()
    request = f"GET {r.path} HTTP/1.1\r\nHost: x\r\nX-Padding: {'a' * 200}\r\n\r\n".encode()
    with connect(r.port) as s:
        sent = 0
        try:
            for b in request:
                s.sendall(bytes([b]))
                sent += 1
                if closed_by_server(s):
                    break
                time.sleep(0.05)
        except ConnectionError:
            pass
    assert sent < len(request) // 2, f"the server took {sent} of {len(request)} dripped bytes"
    wait_for(lambda: r.server.active_connections == 0, 10, "r.server.active_connections == 0", interval=0.05)


def test_connections_past_the_bounds_get_503_and_room_comes_back(served):
    r = served(ServerLimits(header_timeout=30, request_timeout=30, max_connections=4, max_per_client=3))
    held = [connect(r.port) for _ in range(3)]
    try:
        wait_for(lambda: r.server.active_connections == 3, 10, "r.server.active_connections == 3", interval=0.05)
        with connect(r.port) as s:  # a 4th from the same address: past max_per_client
            assert s.recv(64).startswith(b"HTTP/1.1 503 ")
        assert status_of(r.port, r.path, source="127.0.0.2") == 200  # another address has room
        wait_for(lambda: r.server.active_connections == 3, 10, "that answered connection's end", interval=0.05)
        held.append(connect(r.port, source="127.0.0.2"))
        wait_for(lambda: r.server.active_connections == 4, 10, "r.server.active_connections == 4", interval=0.05)
        with connect(r.port, source="127.0.0.3") as s:  # past max_connections
            assert s.recv(64).startswith(b"HTTP/1.1 503 ")
    finally:
        for s in held:
            s.close()
    wait_for(lambda: r.server.active_connections == 0, 10, "r.server.active_connections == 0", interval=0.05)
    assert status_of(r.port, r.path) == 200


@pytest.fixture
def big_origin(signed_catalogue):
    """The origin with a 48 MiB image and a short request deadline; yields (port, image bytes)."""
    images = signed_catalogue.cat.root / "images"
    data = bytes(range(256)) * (48 << 12)
    (images / "big.img").write_bytes(data)
    running = []

    def run(limits: ServerLimits) -> tuple[SiteHTTPServer, int, bytes]:
        running.append(start("origin", signed_catalogue.cat.root, limits))
        return running[-1].server, running[-1].port, data
    yield run
    for r in running:
        r.stop()


def read_all(s: socket.socket) -> bytes:
    out = bytearray()
    try:
        while chunk := s.recv(1 << 20):
            out += chunk
    except (ConnectionError, socket.timeout):
        pass
    return bytes(out)


def test_a_reader_too_slow_for_its_answer_is_cut_off(big_origin):
    """request_timeout plus the body at min_send_rate (here about 1 s in all): a client that stops
    reading holds the server's thread no longer than that."""
    server, port, data = big_origin(ServerLimits(header_timeout=5, request_timeout=1, min_send_rate=1 << 30))
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /images/big.img HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for(lambda: server.active_connections == 1, 10, "the request taken", interval=0.05)
        # Not reading: the server's sends block once the socket buffers are full, until it cuts off.
        wait_for(lambda: server.active_connections == 0, 20, "the slow reader cut off", interval=0.05)
        s.settimeout(5)
        got = read_all(s)
    assert got.startswith(b"HTTP/1.1 200 ") and len(got) < len(data)


def test_a_large_answer_read_steadily_gets_its_time_and_keep_alive_works(big_origin):
    """The same 1 s request deadline, but the 48 MiB body adds its length at 64 KiB/s: read over
    3 s, it is sent whole, and the next request on the kept-alive connection (after an idle pause shorter than the
    header timeout) is answered too."""
    server, port, data = big_origin(ServerLimits(header_timeout=5, request_timeout=1, min_send_rate=64 << 10))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /images/big.img HTTP/1.1\r\nHost: x\r\n\r\n")
        got = bytearray()
        started = time.monotonic()
        while b"\r\n\r\n" not in got or len(got) - got.index(b"\r\n\r\n") - 4 < len(data):
            chunk = s.recv(1 << 20)
            assert chunk, f"closed after {len(got)} bytes"
            got += chunk
            # Read at 16 MiB/s: 3 s for the body, past the bare request deadline.
            time.sleep(max(0.0, started + len(got) / (16 << 20) - time.monotonic()))
        assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(data)
        time.sleep(1.5)
        s.sendall(b"GET /index.yaml HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_all(s).startswith(b"HTTP/1.1 200 ")
