"""Waiting in tests for something real (a VM, a daemon, a job) to reach a state."""
from __future__ import annotations

import time


def wait_for(check, timeout: float, what: str, interval: float = 0.3):
    """Polls `check` until it returns something true and returns that value; fails the test
    naming `what` when `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
