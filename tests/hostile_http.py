"""A hostile or broken HTTP origin on loopback: each connection gets one scripted misbehaviour.

Real sockets, a real thread per connection; the client under test speaks to it as to any origin.
"""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

DRIP_SECONDS = 60.0  # how long a dripping answer would last if the client let it


class HostileOrigin:
    """Serves files from `root` (index.yaml, torrents/...) wrongly, as `modes` says: one mode per
    connection, cycling (`drip`, `drip-headers`, `bad-status`, `long-line`, `truncated`, `ok`)."""

    def __init__(self, root: Path, modes: list[str]):
        self.root = root
        self.modes = modes
        self.served: list[tuple[str, str]] = []  # (mode, path) per connection
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}/"

    def __enter__(self) -> "HostileOrigin":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._listener.close()

    def _accept(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            mode = self.modes[n % len(self.modes)]
            n += 1
            threading.Thread(target=self._answer, args=(conn, mode), daemon=True).start()

    def _answer(self, conn: socket.socket, mode: str) -> None:
        with conn:
            try:
                conn.settimeout(10)
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    request += chunk
                path = request.split(b" ")[1].decode()
                self.served.append((mode, path))
                body = (self.root / path.lstrip("/")).read_bytes()
                head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                if mode == "ok":
                    conn.sendall(head + body)
                elif mode == "truncated":
                    conn.sendall(head + body[:len(body) // 2])
                elif mode == "bad-status":
                    conn.sendall(b"HTTP/1.1 2OO OK\r\n\r\n" + body)
                elif mode == "long-line":
                    conn.sendall(b"HTTP/1.1 200 " + b"O" * 70000 + b"\r\n\r\n")
                elif mode in ("drip", "drip-headers"):
                    # A byte every 50 ms: each read is far inside any per-read timeout.
                    data = head + body if mode == "drip-headers" else body
                    if mode == "drip":
                        conn.sendall(head)
                    end = time.monotonic() + DRIP_SECONDS
                    for b in data:
                        if self._stop.is_set() or time.monotonic() > end:
                            return
                        conn.sendall(bytes([b]))
                        time.sleep(0.05)
                else:
                    raise ValueError(mode)
            except OSError:
                return  # the client gave up: what a deadline is for
