"""The frame the three commands (`salvus_jobs`, `imgdist`, `salvus-vmjob`) share: -v/-vv logging,
a SalvusError as one line `prog: message` with its exit code, Ctrl-C as 130, and plain tables.

A command builds its own argparse parser and hands `run_command` the function to call; everything a
user sees when something goes wrong is decided here, so the three behave alike.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import Any, Callable, Sequence

from cluster.errors import SalvusError

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C

LOG_FORMAT = "%(asctime)s.%(msecs)03d %(name)s %(levelname)s: %(message)s"
LOG_DATEFMT = "%H:%M:%S"


SPEC_HELP = "cluster spec (default: ./cluster.yaml, then $SALVUS_SPEC)"


def add_verbose(parser: argparse.ArgumentParser, default: Any = 0,
                help_text: str = "more log output (-vv: debug)") -> None:
    """-v/--verbose, counted: each -v lowers the log threshold one level (see `setup_logging`)."""
    parser.add_argument("-v", "--verbose", action="count", default=default, help=help_text)


def common_options(verbose_help: str = "more log output (-vv: debug)") -> argparse.ArgumentParser:
    """--spec and -v as a parent for a command and each of its subcommands; `parse` fills them in."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: the option is accepted before or after the subcommand without one hiding the other.
    common.add_argument("--spec", metavar="FILE", default=argparse.SUPPRESS, help=SPEC_HELP)
    add_verbose(common, default=argparse.SUPPRESS, help_text=verbose_help)
    return common


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """`parser.parse_args` with the common options' defaults (no spec named, no -v) filled in."""
    args = parser.parse_args(argv)
    args.spec = getattr(args, "spec", None)
    args.verbose = getattr(args, "verbose", 0)
    return args


def setup_logging(verbosity: int, quiet_level: int = logging.WARNING, fmt: str = LOG_FORMAT,
                  datefmt: str = LOG_DATEFMT) -> None:
    """Logs to stderr from `quiet_level` down, one level per -v, never below debug."""
    logging.basicConfig(level=max(quiet_level - 10 * (verbosity or 0), logging.DEBUG), stream=sys.stderr,
                        format=fmt, datefmt=datefmt)


def run_command(prog: str, func: Callable[[], int | None]) -> int:
    """Calls `func` and turns the errors a user can act on into one line and an exit code."""
    try:
        return int(func() or 0)
    except SalvusError as e:
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`salvus_jobs spec schema | head`): not an error of ours. Python's
        # own recipe: point stdout at /dev/null so the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def printable(text: str) -> str:
    """`text` with control characters (C0, DEL, C1) as `\\xNN`: cells come from the registry and
    the scheduler, which any writer fills, and `\\x1b]0;...` would retitle the operator's terminal."""
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, no trailing blanks, no final newline; control
    characters escaped (`printable`)."""
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows])


def format_age(seconds: float) -> str:
    """A duration as a person reads it at a glance: 45s, 12m, 5h, 3d."""
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def format_size(n: int | None) -> str:
    """Bytes as a person reads them in a table: 512 B, 1.4 MiB, 64 MiB, 2.0 GiB ("-": unknown)."""
    if n is None:
        return "-"
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    k = 0
    while k + 1 < len(units) and n >= 1024 ** (k + 1):
        k += 1
    value = n / 1024 ** k
    return f"{value:.1f} {units[k]}" if k and value < 9.95 else f"{value:.0f} {units[k]}"
