"""A guest's serial console log, kept under a size cap (`hypervisor.console_log_max_mb`), so a chatty
guest cannot fill the file system that holds base images, persistent disks and the registry.

QEMU writes the log through an O_APPEND descriptor (the console's `-chardev socket,...,logfile=LOG,
logappend=on`; libvirt's `<log file=LOG append='on'/>`, which virtlogd may write for QEMU, appending
as well; virtlogd may also rotate the file at its own max_size, 2 MiB by default: not tested here),
so the wrapper can cut it in place: once it is past the cap, its last cap's worth of bytes is read,
the log is truncated to one marker line, and those bytes replace `LOG.1` (a new file, renamed over
the old one). QEMU's next write lands at the new end, leaving no
hole. The log and `LOG.1` together hold at least the last cap of output and about twice the cap at
most, plus what the guest writes between two checks (half a second apart). What the guest writes
between reading the end and the truncation (microseconds) is lost, so `LOG.1` may end mid-line.
"""
from __future__ import annotations

import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.files import STATE_MODE, write_atomic

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 0.5
_READ_CHUNK = 1 << 20


def rotated_path(console_log: Path) -> Path:
    return console_log.with_name(console_log.name + ".1")


@dataclass
class ConsoleLogCap:
    path: Path
    max_bytes: int
    rotations: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def check(self) -> bool:
        """Cuts the log when it is over the cap; True when it did."""
        try:
            # O_APPEND: the marker goes after whatever QEMU wrote since the truncation.
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size <= self.max_bytes:
                return False
            tail = self._tail(fd, st.st_size - self.max_bytes)
            # Cut at once: what the guest writes between reading the end and the cut is lost, so
            # the slow part (writing and syncing LOG.1) comes after it.
            os.ftruncate(fd, 0)
            os.write(fd, (f"=== salvus-vmjob: console log passed {self.max_bytes} bytes at "
                          f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; the output before this "
                          f"line is in {rotated_path(self.path).name} ===\n").encode())
        finally:
            os.close(fd)
        try:
            write_atomic(rotated_path(self.path), tail, STATE_MODE)
        except OSError as e:  # the cap matters more than the old output
            log.warning("cannot keep the console log's tail in %s (%s); dropped it",
                        rotated_path(self.path), e.strerror or e)
        self.rotations += 1
        if self.rotations == 1:
            log.warning("console log %s passed %d bytes: keeping its last %d bytes in %s (logged once)",
                        self.path, self.max_bytes, self.max_bytes, rotated_path(self.path).name)
        return True

    def _tail(self, fd: int, start: int) -> bytes:
        """The last `max_bytes` of the file from `start` to its end, read until the end stops moving
        (what is written after that, up to the truncation, is lost); a writer faster than this reader
        is cut off after 16 caps, so the check always ends."""
        buf, offset, limit = bytearray(), start, start + 16 * self.max_bytes
        while offset < limit:
            chunk = os.pread(fd, min(_READ_CHUNK, limit - offset), offset)
            if not chunk:
                break
            buf += chunk
            offset += len(chunk)
            if len(buf) > 2 * self.max_bytes:
                del buf[:-self.max_bytes]
        return bytes(buf[-self.max_bytes:])

    def start(self) -> None:
        """Checks every CHECK_INTERVAL_S in a daemon thread until `stop`."""
        self._thread = threading.Thread(target=self._watch, name="console-log-cap", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(CHECK_INTERVAL_S):
            try:
                self.check()
            except OSError as e:  # e.g. the log's directory removed under us: try again later
                log.debug("console log check failed: %s", e)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
