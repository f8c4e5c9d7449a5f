"""Fetching the signed index and torrents from the origin: never more than the limit (endless
data), never longer than a deadline (a server dripping bytes), every transport failure a
TempFailure (75) so a timer or scheduler simply tries again.

A socket timeout bounds each read only: a server sending a byte a second held a fetch 8 s past a
1 s timeout. So each fetch has a deadline, enforced by shutting its sockets down from a timer
(which also ends a dripped status line or header), and a minimum average rate for the body.
"""
from __future__ import annotations

import http.client
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from cluster.errors import DataError, TempFailure
from catalogue.index import MAX_SIG_BYTES

DEFAULT_TIMEOUT = 30.0
_CHUNK = 64 << 10


@dataclass(frozen=True)
class FetchLimits:
    timeout: float = DEFAULT_TIMEOUT  # seconds: connecting, and each read
    deadline: float = 120.0  # seconds for the whole fetch: connect, headers and body
    min_rate: int = 16 << 10  # bytes/s averaged over the body, once `grace` seconds have passed
    grace: float = 10.0


class _Deadline:
    """Shuts down every socket of one fetch once its time is up (blocked reads then return)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)
            if self.expired:
                self._shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for s in self._socks:
                self._shut(s)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            # socket.socket's own shutdown, also for a TLS socket: its SSL state stays for the
            # thread reading it, which just sees the connection end.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


def _watched(base: type[http.client.HTTPConnection], deadline: _Deadline) -> type[http.client.HTTPConnection]:
    class Watched(base):  # type: ignore[valid-type, misc]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            create = self._create_connection

            def create_watched(*a, **kw):
                sock = create(*a, **kw)
                deadline.watch(sock)  # before TLS: a dripped handshake is bounded too
                return sock
            self._create_connection = create_watched
    return Watched


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(_watched(http.client.HTTPConnection, deadline), req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(_watched(http.client.HTTPSConnection, deadline), req, context=self._context)

    return urllib.request.build_opener(HTTP, HTTPS)


def fetch_bytes(url: str, max_bytes: int, limits: FetchLimits = FetchLimits()) -> bytes:
    """The body at `url`; DataError past `max_bytes` (whatever Content-Length claims), TempFailure
    (75) when the origin cannot be reached, answers an error, breaks the protocol, sends less than
    it announced, or is slower than the limits allow."""
    started = time.monotonic()
    try:
        with _Deadline(limits.deadline) as deadline:
            try:
                with _opener(deadline).open(url, timeout=limits.timeout) as resp:
                    claimed = resp.headers.get("Content-Length")
                    length = int(claimed) if claimed and re.fullmatch(r"[0-9]{1,20}", claimed) else None
                    if length is not None and length > max_bytes:
                        raise DataError(f"{url}: {claimed} bytes exceeds the limit of {max_bytes} bytes; refused unread")
                    data = _read_body(resp, url, max_bytes, limits, started)
            finally:
                # To http.client a read the timer ended looks like an early end of the body or a
                # dropped connection; this says which it was.
                expired = deadline.expired
    except urllib.error.HTTPError as e:
        raise TempFailure(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        if expired:
            raise TempFailure(f"{url}: not fetched within {limits.deadline:g} s; will retry") from None
        if isinstance(e, http.client.InvalidURL):
            raise DataError(f"{url}: not a valid URL: {e}") from None
        raise TempFailure(f"{url}: cannot fetch: {_reason(e)}") from None
    if expired:
        raise TempFailure(f"{url}: not fetched within {limits.deadline:g} s; will retry")
    if len(data) > max_bytes:
        raise DataError(f"{url}: more than the limit of {max_bytes} bytes; refused")
    if length is not None and len(data) < length:
        # Not the signature's or the hash's business: the bytes never arrived.
        raise TempFailure(f"{url}: the connection ended after {len(data)} of {length} bytes; will retry")
    return data


def _read_body(resp, url: str, max_bytes: int, limits: FetchLimits, started: float) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got <= max_bytes:
        chunk = resp.read1(min(_CHUNK, max_bytes + 1 - got))  # one recv: a drip is seen as one
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
        elapsed = time.monotonic() - started
        if elapsed > limits.grace and got < limits.min_rate * elapsed:
            raise TempFailure(f"{url}: {got} bytes in {elapsed:.0f} s, slower than the minimum of "
                              f"{limits.min_rate} bytes/s; will retry")
    return b"".join(chunks)


def _reason(e: BaseException) -> str:
    if isinstance(e, http.client.HTTPException):
        # A bad status line carries what the server sent: quoted, and only its start.
        return f"{type(e).__name__} {str(e)[:100]!r}" if str(e) else type(e).__name__
    reason = getattr(e, "reason", None)
    return str(reason if reason is not None else e)[:200]


# One path segment of a file the origin serves: nothing `urljoin` could read as a parent or other
# directory ('/', '\\', '..'), another host or scheme (':'), a query or fragment ('?', '#'), or an
# escape of any of these ('%').
_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,200}")


def origin_file_url(base_url: str, *segments: str, what: str = "file name") -> str:
    """The URL of the origin's file at `base_url` + SEGMENT/SEGMENT...; DataError (65, like any
    other invalid index content) unless each segment is one plain name and the result stays under
    the base. The names come from the index: signed, but served by the origin or a peer."""
    if not base_url.startswith(("http://", "https://")):
        raise DataError(f"catalogue URL {base_url!r}: expected http(s)://HOST:PORT/")
    base = base_url if base_url.endswith("/") else base_url + "/"
    for seg in segments:
        if not _SEGMENT_RE.fullmatch(seg) or ".." in seg:
            raise DataError(f"{what} {'/'.join(segments)[:120]!r}: not a plain file name on the origin (each "
                            "path segment: a letter or digit, then letters, digits, '_.+-', no '..')")
    url = urllib.parse.urljoin(base, "/".join(segments))
    joined, under = urllib.parse.urlsplit(url), urllib.parse.urlsplit(base)
    if ((joined.scheme, joined.netloc) != (under.scheme, under.netloc) or not joined.path.startswith(under.path)
            or joined.query or joined.fragment):
        raise DataError(f"{what} {'/'.join(segments)[:120]!r}: resolves to {url[:200]!r}, outside the origin {base}")
    return url


def fetch_signed_index(base_url: str, max_bytes: int, limits: FetchLimits = FetchLimits()) -> tuple[bytes, bytes]:
    """(index.yaml bytes, index.yaml.sig bytes) from the origin at `base_url`."""
    raw = fetch_bytes(origin_file_url(base_url, "index.yaml"), max_bytes, limits)
    sig = fetch_bytes(origin_file_url(base_url, "index.yaml.sig"), MAX_SIG_BYTES, limits)
    return raw, sig
