"""Pull progress for people: bars on a terminal, a log line every few seconds otherwise."""
from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from imagedist.swarm import PullProgress

log = logging.getLogger("imgdist")

LOG_EVERY = 5.0
BAR = 30
MiB = 1 << 20


def bar_line(p: PullProgress) -> str:
    filled = int(BAR * p.percent / 100)
    extra = f" banned {len(p.banned)}" if p.banned else ""
    extra += " +web seed" if p.web_seed_used else ""
    return (f"{p.key:<28} [{'#' * filled}{'.' * (BAR - filled)}] {p.percent:5.1f}% "
            f"{p.rate / MiB:6.1f} MiB/s {p.state}{extra}")


class ProgressView:
    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self._last_log = 0.0
        self._drawn = 0

    def __call__(self, progs: list[PullProgress]) -> None:
        if self.tty:
            if self._drawn:
                self.out.write(f"\x1b[{self._drawn}F")
            for p in progs:
                self.out.write("\x1b[2K" + bar_line(p) + "\n")
            self.out.flush()
            self._drawn = len(progs)
            return
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY:
            self._last_log = now
            for p in progs:
                if p.state in ("downloading", "checking"):
                    log.info("%s: %.1f%% of %.0f MiB, %.1f MiB/s", p.key, p.percent, p.total / MiB, p.rate / MiB)
