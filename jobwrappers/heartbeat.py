"""Keeping a registered service alive in the registry while its VM runs.

A registry outage must not take the VM down: failures are logged and retried with a backoff that
stays well inside the TTL, and a row that expired meanwhile is registered again.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from cluster.registry import Registry, Service

log = logging.getLogger(__name__)


@dataclass
class Heartbeater:
    registry: Registry
    service: Service
    interval: float
    ttl: float
    next_due: float = 0.0
    failures: int = field(default=0)

    def start(self) -> None:
        self.registry.register(self.service)
        self.next_due = time.monotonic() + self.interval

    def seconds_until_due(self) -> float:
        return max(0.0, self.next_due - time.monotonic())

    def beat_if_due(self) -> None:
        now = time.monotonic()
        if now < self.next_due:
            return
        try:
            if not self.registry.heartbeat(self.service.service_id, owner=self.service):
                log.warning("registry had no live row of ours for %s (expired, or registered by another "
                            "writer); registering again", self.service.service_id)
                self.registry.register(self.service)
        except Exception as e:  # any backend failure: the VM keeps running, the beat is retried
            self.failures += 1
            retry = min(self.interval, max(0.5, self.ttl / 6) * 2 ** min(self.failures - 1, 4))
            log.warning("heartbeat for %s failed (%s); retrying in %.1f s",
                        self.service.service_id, e, retry)
            self.next_due = now + retry
            return
        if self.failures:
            log.info("registry reachable again after %d failed heartbeat(s)", self.failures)
        self.failures = 0
        self.next_due = now + self.interval

    def deregister(self) -> None:
        try:
            self.registry.deregister(self.service.service_id)
        except Exception as e:
            log.warning("could not deregister %s (%s); its row expires by itself within %s s",
                        self.service.service_id, e, self.ttl)
