"""A held lease: the fencing check every action of a controller (or a one-shot `scale`) makes.

The registry keeps the lease (`Registry.acquire_lease`); this object remembers the token it was
given and when it last renewed, by the monotonic clock. `fence()` refuses (StaleLease) when either
says the lease may have passed on: the local deadline, which a process paused by SIGSTOP has
overrun when it resumes (the monotonic clock keeps running while it is stopped), and the registry
itself, asked before every action, so a holder whose lease another one took never acts twice.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field

from cluster.errors import TempFailure
from cluster.registry.base import LeaseInfo, Registry

log = logging.getLogger(__name__)

CONTROLLER_LEASE = "controller"  # one name for the controller and `scale`: one reconciler at a time


class StaleLease(TempFailure):
    """The lease expired or passed on: whoever held it must not act (exit 75: run again)."""


def holder_name(kind: str) -> str:
    """`KIND HOST:PID:RANDOM`: unique per process, readable in `status` ("controller" or "scale")."""
    return f"{kind} {socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def holder_kind(holder: str) -> str:
    return holder.partition(" ")[0]


@dataclass
class HeldLease:
    registry: Registry
    name: str
    holder: str
    token: int
    ttl: int
    renewed: float = field(default_factory=time.monotonic)

    @classmethod
    def try_acquire(cls, registry: Registry, name: str, holder: str, ttl: int) -> "HeldLease | None":
        started = time.monotonic()  # before asking: the registry's expiry counts from about then
        token = registry.acquire_lease(name, holder, ttl)
        return cls(registry, name, holder, token, ttl, started) if token is not None else None

    def left(self) -> float:
        """Seconds the lease surely has left by our own clock."""
        return self.ttl - (time.monotonic() - self.renewed)

    def renew(self) -> bool:
        started = time.monotonic()
        if self.left() <= 0 or not self.registry.renew_lease(self.name, self.holder, self.token, self.ttl):
            return False
        self.renewed = started
        return True

    def fence(self, action: str) -> None:
        """Raises StaleLease unless the lease is still ours with our token; renews it when half is
        gone, so a long run of actions (a `scale` submitting hundreds) keeps it."""
        if self.left() <= 0:
            raise StaleLease(f"{action}: refused: lease {self.name} (token {self.token}) ran out "
                             f"{-self.left():.1f}s ago by this process's clock (was it paused?)")
        if self.left() < self.ttl / 2:
            if not self.renew():
                raise StaleLease(f"{action}: refused: lease {self.name} (token {self.token}) could not be renewed")
        elif not self.registry.lease_valid(self.name, self.holder, self.token):
            raise StaleLease(f"{action}: refused: lease {self.name} token {self.token} is stale "
                             f"(now {describe(self.registry.lease(self.name))})")

    def release(self) -> None:
        self.registry.release_lease(self.name, self.holder, self.token)


def describe(info: LeaseInfo | None) -> str:
    return "free" if info is None else f"held by {info.holder} with token {info.token}"
