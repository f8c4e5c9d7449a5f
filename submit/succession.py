"""The rules of replacing a VM without the role dipping below its count, with no I/O: when a job
is due for succession, how long ahead (the lead time), and which retiring jobs may be drained now.
The controller (submit/controller.py) applies them to what it listed and probed.

A job *retires* for one of two reasons: its walltime (the earliest moment the scheduler may signal
it, `Backend.earliest_signal`, is nearer than the role's lead time) or an upgrade (it boots an image
the role's rollout replaces). A retiring job is not counted, so the plan submits its replacement;
it keeps serving until enough of the others are healthy, then it is drained: deregistered (hubs stop
sending it work), left `drain_seconds` to finish, then stopped gracefully. A persistent role's
successor needs the disk its predecessor holds: it is queued behind it (`submit_successor`), and the
predecessor is stopped at the last moment that still lets it shut down before its signal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Retiring:
    """A job being replaced, and how far its drain has come (monotonic-free epoch seconds)."""

    job_id: str
    role: str
    service_id: str
    reason: str  # "walltime" or "upgrade"
    since: float
    earliest_signal: float | None = None
    successor: str = ""  # a persistent role's successor job (queued behind this one)
    drain_started: float | None = None  # deregistered
    cancelled: float | None = None
    killed: bool = False


def p95(samples: list[float]) -> float | None:
    """The 95th percentile by the nearest-rank rule; None without samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def lead_time(samples: list[float], floor: float, drain_seconds: float, interval: float) -> float:
    """Seconds before a job's earliest signal that its successor is submitted: submit-to-healthy
    (p95 of what was measured, at least `floor`), then the predecessor's drain, and two cycles of
    slack (the controller notices health and acts once per interval)."""
    return max(floor, p95(samples) or 0.0) + drain_seconds + 2 * interval


def due(now: float, earliest_signal: float | None, lead: float) -> bool:
    return earliest_signal is not None and earliest_signal - now < lead


def last_safe_stop(earliest_signal: float, drain_seconds: float, stop_s: float, interval: float) -> float:
    """When a persistent role's predecessor must start draining so that its drain and its guest's
    shutdown are over before the scheduler may signal it."""
    return earliest_signal - drain_seconds - stop_s - interval


def drainable(serving_fresh: int, serving_retiring: int, desired: int) -> int:
    """How many still-serving retiring jobs may be drained now without fewer than `desired` left
    serving: healthy jobs that are not retiring count first."""
    return max(0, min(serving_retiring, serving_fresh + serving_retiring - desired))
