"""The threading HTTP server the origin (`catalogue serve`) and the tracker share, bounded so that
slow or silent clients cannot hold it (slowloris).

socketserver gives every connection a thread and waits on it forever: 200 half-open requests were
still held after 40 s. Here every connection has a deadline that a single watchdog thread enforces
by shutting the socket down (a per-read timeout alone lets a client sending one byte every few
seconds stay forever): `header_timeout` for the request line and headers, counted from the accept
or from the end of the previous answer on a keep-alive connection, then `request_timeout` for the
answer, plus the body's length at `min_send_rate` (a handler says how long its body is with
`GuardedHandler.allow_body`). At most `max_connections` are served at once, `max_per_client` from
one address; a connection past either bound gets a 503 at once and is closed.
"""
from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 0\r\n"
         b"Connection: close\r\n\r\n")


@dataclass(frozen=True)
class ServerLimits:
    header_timeout: float = 20.0  # seconds for a request line and its headers
    request_timeout: float = 60.0  # seconds from the headers to the answer's end, besides its body
    min_send_rate: int = 64 << 10  # bytes/s: a body of N bytes adds N / this to request_timeout
    max_connections: int = 512
    # A site's hosts each hold a few (index, torrents, one web seed connection per pull); one
    # machine running many test hosts holds more.
    max_per_client: int = 64


@dataclass
class _Due:
    at: float  # time.monotonic()
    what: str
    client: str
    seconds: float
    quiet: bool  # an idle keep-alive connection: its end is routine, logged at debug only


class _Watchdog:
    """Deadlines per connection; shuts a connection down once its deadline passes."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[socket.socket, _Due] = {}
        self._thread: threading.Thread | None = None
        self._wake_at = float("inf")  # when the thread wakes by itself: no notify for later deadlines
        self._closed = False

    def set(self, sock: socket.socket, seconds: float, what: str, client: str, quiet: bool = False) -> None:
        with self._cond:
            if self._closed:
                return
            due = self._due[sock] = _Due(time.monotonic() + seconds, what, client, seconds, quiet)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="http-watchdog", daemon=True)
                self._thread.start()
            if due.at < self._wake_at:
                self._cond.notify()

    def extend(self, sock: socket.socket, seconds: float) -> None:
        with self._cond:
            due = self._due.get(sock)
            if due is not None:
                due.at += seconds
                due.seconds += seconds

    def drop(self, sock: socket.socket) -> None:
        with self._cond:
            self._due.pop(sock, None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                for sock, due in list(self._due.items()):
                    if due.at <= now:
                        del self._due[sock]
                        log.log(logging.DEBUG if due.quiet else logging.INFO, "closing the connection from "
                                "%s: %s not done within %.1f s", due.client, due.what, due.seconds)
                        try:
                            # Wakes the handler's blocked recv/send; its thread then ends. The
                            # socket object, not its number, so a reused descriptor is never hit.
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass  # already closed by its handler
                self._wake_at = min((due.at for due in self._due.values()), default=float("inf"))
                self._cond.wait(None if self._wake_at == float("inf") else max(self._wake_at - now, 0.01))


class GuardedHandler(BaseHTTPRequestHandler):
    """The per-request deadlines. SiteHTTPServer mixes this into any handler it is given."""

    server: "SiteHTTPServer"

    def setup(self) -> None:
        # Every single read or send, too, is bounded (the watchdog bounds their sum).
        self.timeout = self.server.limits.header_timeout
        super().setup()

    def handle_one_request(self) -> None:
        super().handle_one_request()
        # The answer is out: the next request on this keep-alive connection has header_timeout.
        self.server.watchdog.set(self.connection, self.server.limits.header_timeout,
                                 "the next request on a kept-alive connection", self.client_address[0], quiet=True)

    def parse_request(self) -> bool:
        ok = super().parse_request()  # reads the headers
        self.server.watchdog.set(self.connection, self.server.limits.request_timeout,
                                 f"the answer to {self.command or 'a request'}", self.client_address[0])
        return ok

    def allow_body(self, length: int) -> None:
        """The answer's body is `length` bytes: the request may take that long at min_send_rate."""
        self.server.watchdog.extend(self.connection, length / self.server.limits.min_send_rate)


class SiteHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server for requests from every hypervisor of a site at once.

    socketserver listens with a backlog of 5: when a site's hypervisors sync together (a reload,
    daemons started together, the same --interval), the SYNs past the sixth were dropped and those
    hosts retried 1 s, 3 s later; on the benchmark LAN two of eight started their pull 1.2 and 2.3 s
    late. The kernel caps the backlog at net.core.somaxconn.
    """

    request_queue_size = 1024
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 limits: ServerLimits | None = None):
        self.limits = limits or ServerLimits()
        self.watchdog = _Watchdog()
        self._lock = threading.Lock()
        self._per_client: dict[str, int] = {}
        self._active = 0
        self._full_logged = False
        if not issubclass(handler, GuardedHandler):
            handler = type(handler.__name__, (GuardedHandler, handler), {})
        super().__init__(address, handler)

    @property
    def active_connections(self) -> int:
        with self._lock:
            return self._active

    def process_request(self, request: socket.socket, client_address) -> None:
        client = client_address[0]
        with self._lock:
            busy = self._active >= self.limits.max_connections or \
                self._per_client.get(client, 0) >= self.limits.max_per_client
            if not busy:
                self._active += 1
                self._per_client[client] = self._per_client.get(client, 0) + 1
            elif not self._full_logged:
                self._full_logged = True
                log.warning("refusing connections (503): %d open, %d from %s (limits %d, %d per client)",
                            self._active, self._per_client.get(client, 0), client,
                            self.limits.max_connections, self.limits.max_per_client)
        if busy:
            try:
                request.setblocking(False)  # never wait on a client the server has no room for
                request.send(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        self.watchdog.set(request, self.limits.header_timeout, "the request line and headers", client)
        try:
            super().process_request(request, client_address)
        except RuntimeError:  # no thread to be had
            self._release(client)
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request: socket.socket, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(client_address[0])

    def _release(self, client: str) -> None:
        with self._lock:
            self._active -= 1
            left = self._per_client.get(client, 1) - 1
            if left:
                self._per_client[client] = left
            else:
                self._per_client.pop(client, None)
            self._full_logged = False

    def shutdown_request(self, request: socket.socket) -> None:
        self.watchdog.drop(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        # A client that went away (or that the watchdog cut off) is no error of the server's; the
        # base class would print a traceback to stderr for it.
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            log.debug("%s: connection ended: %s", client_address[0], err)
        else:
            log.error("%s: request failed: %s: %s", client_address[0], type(err).__name__, err, exc_info=True)

    def server_close(self) -> None:
        self.watchdog.close()
        super().server_close()
