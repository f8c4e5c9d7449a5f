"""Keeping a registered service alive in the registry while its VM runs.

A registry outage must not take the VM down: failures are logged and retried with a backoff that
stays well inside the TTL, and a row that expired meanwhile is registered again, unless the
controller deregistered it to drain this job (`DRAINING`): then it stays deregistered until the
job is stopped.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from cluster.registry import Registry, Service
from cluster.registry.base import DRAINING

log = logging.getLogger(__name__)


@dataclass
class Heartbeater:
    registry: Registry
    service: Service
    interval: float
    ttl: float
    next_due: float = 0.0
    failures: int = field(default=0)
    draining: bool = False

    def start(self) -> None:
        self.registry.register(self.service)
        self.next_due = time.monotonic() + self.interval

    def seconds_until_due(self) -> float:
        return max(0.0, self.next_due - time.monotonic())

    def beat_if_due(self) -> None:
        now = time.monotonic()
        if now < self.next_due or self.draining:
            return
        try:
            if not self.registry.heartbeat(self.service.service_id, owner=self.service):
                if self.being_drained():
                    log.info("draining: the controller deregistered %s (job %s); serving what it has "
                             "until the job is stopped", self.service.service_id, self.service.job_id)
                    self.draining = True
                    return
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

    def being_drained(self) -> bool:
        job = self.registry.read_state(DRAINING).get(self.service.service_id)
        return bool(self.service.job_id) and job == self.service.job_id

    def deregister(self) -> None:
        try:
            self.registry.deregister(self.service.service_id)
        except Exception as e:
            log.warning("could not deregister %s (%s); its row expires by itself within %s s",
                        self.service.service_id, e, self.ttl)
