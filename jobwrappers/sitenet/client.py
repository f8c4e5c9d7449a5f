"""The wrapper's side of `salvus-nethelper`: run directly as root, else through `sudo -n` (a site
grants job users exactly that command; README "The site network")."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cluster.errors import EXIT_TEMPFAIL, TempFailure

HELPER_TIMEOUT_S = 60


def helper_argv() -> list[str]:
    if os.geteuid() == 0:
        return [sys.executable, "-P", "-m", "jobwrappers.sitenet.helper"]  # -P: nothing from the current directory
    return ["sudo", "-n", str(Path(sys.executable).parent / "salvus-nethelper")]


def call(*args: str) -> dict | None:
    try:
        proc = subprocess.run([*helper_argv(), *args], capture_output=True, text=True, timeout=HELPER_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TempFailure(f"site network helper {args[0]}: {e}") from None
    if proc.returncode == 0:
        return json.loads(proc.stdout) if proc.stdout.strip() else None
    lines = proc.stderr.strip().splitlines()
    why = lines[-1] if lines else f"exit {proc.returncode}"
    # Whatever the helper refuses is this host's set-up (sudo not granted, the helper missing,
    # network up run with an older spec): 75, so the scheduler runs the job on another host.
    hint = "" if proc.returncode == EXIT_TEMPFAIL else " (this host's set-up: README \"The site network\")"
    raise TempFailure(f"site network helper {args[0]}: {why}{hint}")
