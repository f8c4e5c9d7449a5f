"""The catalogue's HTTP origin: index.yaml, index.yaml.sig, torrents/, images/, with Range requests.

Why not `http.server.SimpleHTTPRequestHandler`: it ignores `Range`, and BitTorrent web seeds (BEP 19)
fetch pieces as byte ranges; answered with the whole file each time, a 1 GiB image would be sent
once per piece. It also serves any file under the directory, where the origin should publish only
the four kinds of path above. So this handler maps those paths itself and implements the single
byte range form web seeds and resuming HTTP clients use (`bytes=A-B`, `bytes=A-`, `bytes=-N`);
a multi-range request is answered with the whole file (200), which RFC 9110 permits.

Timeouts and connection bounds are cluster.httpserver's (shared with the tracker). This server is
for one machine and the tests; a site's production origin is nginx serving the same directory
(contrib/nginx/salvus-catalogue.conf, README "The origin in production").
"""
from __future__ import annotations

import logging
import os
import re
import threading
import urllib.parse
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path

from cluster.httpserver import GuardedHandler, ServerLimits, SiteHTTPServer

log = logging.getLogger(__name__)

_FILE_PART = r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,200}"
# Matched whole (fullmatch): with `^…$` a trailing newline (`%0A`) would also match.
_ROUTES = (
    (re.compile(r"/(index\.yaml)"), "", "application/yaml"),
    (re.compile(r"/(index\.yaml\.sig)"), "", "text/plain; charset=us-ascii"),
    (re.compile(rf"/torrents/({_FILE_PART}\.torrent)"), "torrents", "application/x-bittorrent"),
    (re.compile(rf"/images/({_FILE_PART})"), "images", "application/octet-stream"),
)
_RANGE_RE = re.compile(r"bytes=([0-9]*)-([0-9]*)")
_MAX_DIGITS = 20  # 2**64 has 20 digits
_BEYOND = str(1 << 64)
# A GET/HEAD body is meaningless here; up to this much is read and dropped so the next request on
# the keep-alive connection parses, more (or a chunked body) closes the connection.
MAX_IGNORED_BODY = 64 << 10


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """(first, last) inclusive for a satisfiable single range; None to send the whole file;
    'unsatisfiable' for a range outside the file."""
    if not header:
        return None
    m = _RANGE_RE.fullmatch(header.strip().replace(" ", ""))
    if not m or (not m.group(1) and not m.group(2)):
        return None  # multi-range or malformed: ignore Range, send everything
    # More digits than any file size has: int() of thousands of digits is refused (ValueError) and
    # slow, so such a position is read as "beyond the end" without converting it.
    first_s, last_s = (g if len(g) <= _MAX_DIGITS else _BEYOND for g in m.groups())
    if not first_s:  # suffix range: the last N bytes
        n = int(last_s)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    first = int(first_s)
    if last_s and int(last_s) < first:
        return None  # RFC 9110 14.1.1: an invalid range; the header is ignored, not refused
    if first >= size:
        return "unsatisfiable"
    return first, min(int(last_s), size - 1) if last_s else size - 1


class OriginHandler(GuardedHandler):
    server_version = "salvus-catalogue"
    protocol_version = "HTTP/1.1"  # keep-alive: a web seed issues many range requests
    root: Path  # set on the subclass made by make_server

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("%s " + format, self.address_string(), *args)

    def _resolve(self) -> tuple[Path, str] | None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        for pattern, sub, ctype in _ROUTES:
            m = pattern.fullmatch(path)
            if m:
                path = self.root / sub / m.group(1)
                # A symlink may point within the catalogue (root is resolved), never out of it
                # (a link to /etc/passwd would be served).
                if not path.resolve().is_relative_to(self.root / sub):
                    log.warning("refusing %s: a symlink out of %s", path, self.root / sub)
                    return None
                return path, ctype
        return None

    def _drop_body(self) -> None:
        """Reads and drops a request body, or closes the connection after this answer when it is
        chunked, unreadable or large (else its bytes would be parsed as the next request)."""
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
        elif length is not None:
            if re.fullmatch(r"[0-9]{1,7}", length.strip()) and int(length) <= MAX_IGNORED_BODY:
                self.rfile.read(int(length))
            else:
                self.close_connection = True

    def _error(self, status: HTTPStatus, extra: dict[str, str] | None = None) -> None:
        body = f"{status.value} {status.phrase}\n".encode()
        self.send_response(status)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._drop_body()
        found = self._resolve()
        if found is None:
            return self._error(HTTPStatus.NOT_FOUND)
        path, ctype = found
        try:
            f = open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return self._error(HTTPStatus.NOT_FOUND)
        except PermissionError:
            return self._error(HTTPStatus.FORBIDDEN)
        with f:
            size = os.fstat(f.fileno()).st_size
            rng = parse_range(self.headers.get("Range"), size)
            if rng == "unsatisfiable":
                return self._error(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, {"Content-Range": f"bytes */{size}"})
            first, last = rng if isinstance(rng, tuple) else (0, size - 1)
            length = last - first + 1 if size else 0
            self.send_response(HTTPStatus.PARTIAL_CONTENT if isinstance(rng, tuple) else HTTPStatus.OK)
            if isinstance(rng, tuple):
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(length))
            if path.name.startswith("index.yaml"):
                self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            if self.command == "GET" and length:
                self.allow_body(length)
                try:
                    self.connection.sendfile(f, first, length)
                except OSError as e:  # gone, or cut off by the server's deadlines (cluster.httpserver)
                    self.close_connection = True
                    log.debug("client %s: answer not completed: %s", self.address_string(), e)


def make_server(directory: Path, host: str = "127.0.0.1", port: int = 0,
                limits: ServerLimits | None = None) -> SiteHTTPServer:
    """A bound, not yet serving, origin for `directory` (port 0 picks a free port)."""
    handler = type("BoundOriginHandler", (OriginHandler,), {"root": directory.resolve()})
    return SiteHTTPServer((host, port), handler, limits)


def serve_in_thread(directory: Path, host: str = "127.0.0.1", port: int = 0,
                    limits: ServerLimits | None = None) -> tuple[SiteHTTPServer, str]:
    """An origin running in a background thread and its base URL; `server.shutdown()` stops it."""
    server = make_server(directory, host, port, limits)
    threading.Thread(target=server.serve_forever, name="catalogue-origin", daemon=True).start()
    return server, base_url(server)


def base_url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"
