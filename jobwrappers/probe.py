"""Is the guest really up? The host channel's READY line, then the service answering a probe.

User-mode networking accepts the host-side connect even when nothing listens in the guest, so a
probe only counts when the service sent bytes back.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Callable

from cluster.spec import ProbeSpec

MAX_LINE = 4096  # no line of the protocol is longer (an RSA-16384 HOSTKEY is ~2.8 KiB)


class HostChannel:
    """The host end of the guest's virtio-serial port (a unix socket QEMU listens on)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._buf = b""
        self._scanned = 0  # self._buf[:_scanned] holds no newline
        self._skipping = False

    def connect(self, deadline: float, keep_going: Callable[[], bool]) -> None:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
                self._sock = s
                return
            except OSError:
                s.close()
            if time.monotonic() >= deadline or not keep_going():
                raise TimeoutError(f"host channel {self.path} never appeared")
            time.sleep(0.05)

    def _take_line(self) -> str | None:
        """The next complete line in the buffer; an over-long one is dropped, never buffered whole."""
        while True:
            # Only bytes not yet searched are scanned: a guest trickling a long line in small
            # chunks must not make each chunk rescan the whole buffer.
            end = self._buf.find(b"\n", self._scanned)
            if end >= 0:
                line, self._buf, self._scanned = self._buf[:end], self._buf[end + 1:], 0
                if len(line) <= MAX_LINE:
                    return line.decode(errors="replace").strip()
                continue
            self._scanned = len(self._buf)
            if len(self._buf) > MAX_LINE:
                self._buf, self._scanned = b"", 0
                self._skipping = True
            return None

    def _receive(self, chunk: bytes) -> None:
        if self._skipping:  # the rest of an over-long line
            if b"\n" not in chunk:
                return
            chunk = chunk.partition(b"\n")[2]
            self._skipping = False
        self._buf += chunk

    def read_line(self, deadline: float, keep_going: Callable[[], bool]) -> str:
        assert self._sock is not None
        while (line := self._take_line()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not keep_going():
                raise TimeoutError("no line from the guest")
            self._sock.settimeout(min(remaining, 0.5))
            try:
                chunk = self._sock.recv(4096)
            except socket.timeout:
                continue
            if not chunk:
                raise ConnectionError("host channel closed")
            self._receive(chunk)
        return line

    def poll_lines(self) -> list[str]:
        """The complete lines that have arrived, without waiting."""
        if self._sock is None:
            return []
        self._sock.setblocking(False)
        try:
            while True:
                chunk = self._sock.recv(4096)
                if not chunk:
                    break
                self._receive(chunk)
        except (BlockingIOError, InterruptedError):
            pass
        finally:
            self._sock.setblocking(True)
        lines = []
        while (line := self._take_line()) is not None:
            lines.append(line)
        return lines

    def wait_for(self, word: str, deadline: float, keep_going: Callable[[], bool],
                 other: Callable[[str], None] = lambda line: None) -> str:
        """Blocks until the guest writes a line whose first word is `word`; returns that line.
        Lines before it go to `other` (host keys may come first)."""
        if self._sock is None:
            self.connect(deadline, keep_going)
        while True:
            line = self.read_line(deadline, keep_going)
            if line.split(" ", 1)[0] == word:
                return line
            other(line)

    def wait_ready(self, deadline: float, keep_going: Callable[[], bool]) -> str:
        """Blocks until the guest writes `READY ...`; returns that line."""
        return self.wait_for("READY", deadline, keep_going)

    def send(self, line: str) -> None:
        if self._sock is None:
            raise ConnectionError("host channel not connected")
        self._sock.settimeout(5)
        self._sock.sendall(line.encode() + b"\n")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def probe_once(host: str, port: int, probe: ProbeSpec) -> bytes:
    """Connects, sends the probe's text, returns what came back (raises when nothing did)."""
    with socket.create_connection((host, port), timeout=probe.timeout) as s:
        s.settimeout(probe.timeout)
        if probe.send:
            s.sendall(probe.send.encode())
        got = b""
        deadline = time.monotonic() + probe.timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(4096)
            except socket.timeout:
                break
            if not chunk:
                break
            got += chunk
            if not probe.expect or probe.expect.encode() in got:
                break
    if not got:
        raise ConnectionError(f"{host}:{port} accepted but sent nothing back")
    if probe.expect and probe.expect.encode() not in got:
        raise ConnectionError(f"{host}:{port} answered {got[:80]!r}, expected {probe.expect!r}")
    return got


def probe_until(host: str, port: int, probe: ProbeSpec, deadline: float,
                keep_going: Callable[[], bool], max_interval: float = 0.3) -> bytes:
    """Probes until it answers; the pause between tries doubles from 0.3 s up to `max_interval`
    (readiness: probe polls a guest that may take minutes without hammering its boot)."""
    last: Exception | None = None
    pause = 0.3
    while time.monotonic() < deadline and keep_going():
        try:
            return probe_once(host, port, probe)
        except OSError as e:
            last = e
        time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
        pause = min(pause * 2, max_interval)
    raise TimeoutError(f"probe of {host}:{port} failed: {last or 'stopped'}")
