"""The controller's succession and rolling upgrades (README "Succession and upgrades"): which jobs
retire (their walltime's earliest signal is near, or the role's rollout replaces their image), how
their drains advance, persistent roles' hand-over, rollout failures and halts, and following the
spec file's edits. The rules themselves, without I/O, are submit/succession.py; the rollout rows
submit/rollout.py. A part of `Controller` (submit/controller.py), which owns the state it uses.
"""
from __future__ import annotations

import collections
import logging
import os
import time

from cluster.errors import SalvusError
from cluster.registry import Service
from cluster.registry.base import DRAINING
from cluster.spec import load_spec
from submit.base import ACTIVE_STATES, CLEANUP_GRACE_S, Job
from submit.rollout import Rollout, current, read_rollouts, write_rollout
from submit.succession import Retiring, drainable, due, last_safe_stop, lead_time


class SuccessionMixin:
    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.spec.source)
            return (st.st_mtime_ns, st.st_size)
        except OSError:
            return None

    def _follow_spec(self) -> None:
        """Reads the spec file again when it changed; a spec that no longer loads is not used (the
        running one stays, said once per change)."""
        stamp = self._stamp()
        if stamp == self._spec_stamp or stamp is None:
            return
        self._spec_stamp = stamp
        try:
            fresh = load_spec(self.spec.source)
        except SalvusError as e:
            self.event("spec", f"{self.spec.source} changed but does not load; keeping the running spec: {e}",
                       logging.WARNING)
            return
        if set(fresh.roles) != set(self.spec.roles):
            self.event("spec", f"{self.spec.source} changed its roles; restart the controller to follow that "
                               "(only images and counts are followed live)", logging.WARNING)
            return
        changed = [r for r in fresh.roles if fresh.roles[r].image != self.spec.roles[r].image]
        self.spec.roles = fresh.roles
        self.event("spec", f"{self.spec.source} read again" + (f": new image for {', '.join(changed)}"
                                                               if changed else ""))

    def _follow_rollouts(self) -> None:
        """The rollout of every role (a spec edit of `image:` starts one) and what new jobs boot."""
        rows = read_rollouts(self.spec, self.registry)
        for role in self.spec.roles:
            old = self.rollouts.get(role)
            image = self.spec.roles[role].image
            if role not in rows and old is not None and old.spec_image != image:
                # The spec was edited before any row was written: roll out from what the role booted.
                r = Rollout(target=image, previous=old.image, spec_image=image, started=time.time())
            else:
                r = current(self.spec, role, rows)
            if rows.get(role) != r:  # a new rollout, or the first row of a role (what it boots now)
                assert self.lease is not None
                self.lease.fence(f"record the rollout of {role}")
                write_rollout(self.registry, role, r)
            if old is None or (old.target, old.previous, old.started) != (r.target, r.previous, r.started):
                self._failed[role] = set()
                self._rollout_done.discard(role)
                if r.target != r.previous:
                    self.event("rollout", f"{role}: {r.previous} -> {r.target}, "
                                          f"{self.spec.roles[role].max_surge} at a time")
            self.rollouts[role] = r
            self.backend.images[role] = r.image

    def _fill_images(self, queue: list[Job]) -> None:
        """A listing that does not show a job's image (some schedulers) gets it from our ledger."""
        missing = [j for j in queue if not j.image]
        if missing:
            recorded = {j.job_id: j.image for j in self.backend.ledger.jobs()}
            for j in missing:
                j.image = recorded.get(j.job_id, "")

    def _measure_healthy(self, queue: list[Job]) -> None:
        """Submit-to-healthy per role: what a successor needs, so the lead time."""
        for j in queue:
            sid = j.service_id or j.job_id
            if j.job_id in self._healthy_seen or getattr(self.health.get(sid), "healthy", None) is not True:
                continue
            self._healthy_seen.add(j.job_id)
            samples = self.to_healthy.setdefault(j.role, collections.deque(maxlen=self.cfg.lead_samples))
            samples.append(max(0.0, time.time() - j.submitted))

    def lead(self, role: str) -> float:
        return lead_time(list(self.to_healthy.get(role, ())), self.cfg.lead_floor,
                         self.spec.roles[role].drain_seconds, self.cfg.interval)

    def _healthy(self, job: Job, registered: set[str]) -> bool:
        sid = job.service_id or job.job_id
        return (job.state == "running" and sid in registered and sid not in self.leaving
                and getattr(self.health.get(sid), "healthy", None) is True)

    def _uncounted(self) -> frozenset[str]:
        """Retiring jobs (their replacements are due) and successors queued behind a predecessor
        (a persistent role's retiring job still holds its place: the successor is the extra one)."""
        return frozenset(r.successor or r.job_id for r in self.retiring.values())

    def _count_rollout_failures(self, queue: list[Job]) -> None:
        """New jobs of a rollout's target that never became healthy count against it; at the
        role's max_failures the rollout halts: new jobs boot the previous image again, the old
        VMs are no longer retired and keep serving."""
        now = time.time()
        for role, r in self.rollouts.items():
            if r.halted or r.target == r.previous:
                continue
            failed = self._failed.setdefault(role, set())
            spec_role = self.spec.roles[role]
            for j in queue:
                if j.role != role or j.image != r.target or j.job_id in failed or j.job_id in self._healthy_seen:
                    continue
                sid = j.service_id or j.job_id
                why = ""
                if j.state in ("held", "failed"):
                    why = f"its job is {j.state}{': ' + j.hold_reason if j.hold_reason else ''}"
                elif sid in self.leaving:
                    why = "it was unhealthy"
                elif j.state == "running" and now - (j.started or j.submitted) > (
                        self.spec.boot_timeout(role) + 2 * self.cfg.interval):
                    why = f"not healthy {now - (j.started or j.submitted):.0f}s after it started"
                if not why:
                    continue
                failed.add(j.job_id)
                r.failures += 1
                r.reason = f"{sid} (job {j.job_id}): {why}"
                assert self.lease is not None
                self.lease.fence(f"count a failure of {r.target}")
                self.event("rollout-failure", f"{role}: {r.target} failure {r.failures} of {spec_role.max_failures}: "
                                              f"{r.reason}", logging.WARNING)
                if j.state in ("running", "queued", "held") and sid not in self.leaving:
                    self.backend.cancel(j)
                if r.failures >= spec_role.max_failures:
                    r.halted = True
                    self.event("rollout-halted", f"{role}: {r.target} failed {r.failures} times; halted, new jobs "
                                                 f"boot {r.previous} again and the old VMs keep serving "
                                                 f"(salvus_jobs upgrade {role} --rollback, or fix {r.target})",
                               logging.WARNING)
                    for jid, ret in list(self.retiring.items()):
                        if ret.role == role and ret.reason == "upgrade" and ret.drain_started is None:
                            del self.retiring[jid]
                    self.backend.images[role] = r.image
                write_rollout(self.registry, role, r)
                if r.halted:
                    break

    def _retire(self, queue: list[Job], services: list[Service], registered: set[str],
                desired: dict[str, int]) -> None:
        """Marks jobs due for succession or upgrade as retiring, drains those that may go, and
        moves drains along (deregistered -> stopped -> killed after the grace). `registered`: the
        service ids of `queue` live in the registry, as the cycle read it."""
        now = time.time()
        present = {j.job_id: j for j in queue if j.state in ACTIVE_STATES + ("stopping",)}
        self._advance_drains(queue, present, services, now)
        for role in self.spec.roles:
            mine = [j for j in queue if j.role == role and j.state in ACTIVE_STATES]
            if self.spec.roles[role].persistent:
                self._retire_persistent(role, mine, registered, now)
                continue
            lead = self.lead(role)
            for j in mine:
                if j.job_id in self.retiring or not self._healthy(j, registered):
                    continue
                earliest = self.backend.earliest_signal(j)
                if due(now, earliest, lead):
                    assert earliest is not None
                    self._mark(j, "walltime", earliest, f"its earliest signal is in {earliest - now:.0f}s, within "
                                                        f"the lead time of {lead:.0f}s: submitting its successor")
            r = self.rollouts.get(role)
            if r is not None and not r.halted and r.target != r.previous:
                # In flight: replaced VMs whose replacement is not healthy yet (they are not drained).
                in_flight = sum(1 for x in self.retiring.values()
                                if x.role == role and x.reason == "upgrade" and x.drain_started is None)
                old = sorted((j for j in mine if j.state == "running" and j.image and j.image != r.image
                              and j.job_id not in self.retiring), key=lambda j: j.submitted)
                for j in old[:max(0, self.spec.roles[role].max_surge - in_flight)]:
                    self._mark(j, "upgrade", self.backend.earliest_signal(j),
                               f"boots {j.image}, the rollout moves {role} to {r.image}")
                if not old and not any(x.role == role and x.reason == "upgrade" for x in self.retiring.values()) \
                        and role not in self._rollout_done and any(j.image == r.image for j in mine):
                    self._rollout_done.add(role)
                    self.event("rollout-done", f"{role}: every job boots {r.image}")
            # Drain what may go: never fewer serving than desired.
            serving_fresh = sum(1 for j in mine if j.job_id not in self.retiring and self._healthy(j, registered))
            waiting = sorted((x for x in self.retiring.values() if x.role == role and x.drain_started is None),
                             key=lambda x: (x.earliest_signal or float("inf"), x.since))
            serving = [x for x in waiting if x.job_id in present and self._healthy(present[x.job_id], registered)]
            allowed = drainable(serving_fresh, len(serving), desired.get(role, 0))
            for x in waiting:
                if x not in serving:
                    self._drain(x, "it no longer serves")
                elif allowed > 0:
                    allowed -= 1
                    self._drain(x, f"{serving_fresh} other healthy {role} service(s) for a desired {desired.get(role, 0)}")

    def _mark(self, job: Job, reason: str, earliest: float | None, why: str) -> None:
        assert self.lease is not None
        self.lease.fence(f"retire {job.job_id}")
        self.retiring[job.job_id] = Retiring(job.job_id, job.role, job.service_id or job.job_id, reason,
                                             time.time(), earliest)
        self.metrics.successions.labels(job.role, reason).inc()
        self.event("succession" if reason == "walltime" else "upgrade",
                   f"{job.role} job {job.job_id} ({job.service_id}): {why}")

    def _retire_persistent(self, role: str, mine: list[Job], registered: set[str], now: float) -> None:
        """A persistent role's successor is queued behind its predecessor (it needs the disk); the
        predecessor is stopped at the last safe moment, or at once for an upgrade."""
        spec_role = self.spec.roles[role]
        lead = self.lead(role)
        r = self.rollouts.get(role)
        for j in mine:
            if j.job_id in self.retiring or j.state != "running" or any(x.successor == j.job_id
                                                                       for x in self.retiring.values()):
                continue
            earliest = self.backend.earliest_signal(j)
            upgrade = (r is not None and not r.halted and r.target != r.previous and bool(j.image)
                       and j.image != r.image and self._healthy(j, registered))
            if not (upgrade or (self._healthy(j, registered) and due(now, earliest, lead))):
                continue
            if not self.backend.dependencies:
                if not self._said_no_successors:
                    self._said_no_successors = True
                    self.event("succession", f"{role}: {self.backend.name} cannot queue a job behind another; "
                                             "persistent roles are replaced after their job ends", logging.WARNING)
                continue
            assert self.lease is not None
            self.lease.fence(f"queue the successor of {j.job_id}")
            successor = self.backend.submit_successor(j)
            x = Retiring(j.job_id, role, j.service_id or j.job_id, "upgrade" if upgrade else "walltime", now,
                         earliest, successor=successor.job_id)
            self.retiring[j.job_id] = x
            self.metrics.successions.labels(role, x.reason).inc()
            self.event("succession" if not upgrade else "upgrade",
                       f"{role} job {j.job_id} ({j.service_id}): "
                       + (f"boots {j.image}, moving to {r.image if r else ''}" if upgrade else
                          f"its earliest signal is in {(earliest or now) - now:.0f}s (lead {lead:.0f}s)")
                       + f"; successor job {successor.job_id} queued behind it for its disk")
        for x in [x for x in self.retiring.values() if x.role == role and x.drain_started is None]:
            stop_s = self.spec.stop_timeout(role) + CLEANUP_GRACE_S
            if x.reason == "upgrade" or x.earliest_signal is None or now >= last_safe_stop(
                    x.earliest_signal, spec_role.drain_seconds, stop_s, self.cfg.interval):
                self._drain(x, "the last safe moment before its signal" if x.reason == "walltime"
                            else "its successor boots the new image once the disk is free")

    def _adopt_drains(self, queue: list[Job]) -> None:
        """Drains another controller (or this one, before a restart) began: their jobs stay
        deregistered, so they are stopped now; rows of jobs that have ended are removed."""
        self._drains_adopted = True
        present = {j.job_id: j for j in queue if j.state in ACTIVE_STATES + ("stopping",)}
        now = time.time()
        for sid, jid in self.registry.read_state(DRAINING).items():
            job = present.get(jid)
            assert self.lease is not None
            self.lease.fence(f"adopt the drain of {sid}")
            if job is None or job.role not in self.spec.roles:
                self.registry.write_state(DRAINING, sid, None)
            elif jid not in self.retiring:
                self.retiring[jid] = Retiring(jid, job.role, sid, "adopted", now, self.backend.earliest_signal(job),
                                              drain_started=now)
                self.event("drain", f"{job.role} job {jid} ({sid}): was being drained (a draining row): stopping it "
                                    f"in {self.spec.roles[job.role].drain_seconds:g}s")

    def _drain(self, x: Retiring, why: str) -> None:
        assert self.lease is not None
        self.lease.fence(f"drain {x.job_id}")
        self.registry.write_state(DRAINING, x.service_id, x.job_id)
        self.registry.deregister(x.service_id)
        x.drain_started = time.time()
        self.health.pop(x.service_id, None)  # not "deregistered" news: probed afresh if it comes back
        self.event("drain", f"{x.role} job {x.job_id} ({x.service_id}): deregistered ({why}); stopping it in "
                            f"{self.spec.roles[x.role].drain_seconds:g}s")

    def _advance_drains(self, queue: list[Job], present: dict[str, Job], services: list[Service],
                        now: float) -> None:
        by_sid = {s.service_id: s for s in services}
        listed = {j.job_id: j for j in queue}
        for jid, x in list(self.retiring.items()):
            job = present.get(jid)
            if job is None:
                ended = listed.get(jid)
                if x.drain_started is None:
                    self.event("walltime", f"{x.role} job {jid} ({x.service_id}) ended before it was drained"
                               + (f" (ended by {ended.ended_by})" if ended and ended.ended_by else ""), logging.WARNING)
                else:
                    self.event("drained", f"{x.role} job {jid} ({x.service_id}) has ended"
                               + (f" (ended by {ended.ended_by})" if ended and ended.ended_by else ""))
                if x.successor and x.drain_started is not None:
                    x.cancelled = x.cancelled or now  # the gap is measured once the successor registers
                    self._handover.append(x)
                self.registry.write_state(DRAINING, x.service_id, None)
                del self.retiring[jid]
                continue
            if x.drain_started is None:
                continue
            stop_s = self.spec.stop_timeout(x.role) + CLEANUP_GRACE_S
            if x.cancelled is None and now - x.drain_started >= self.spec.roles[x.role].drain_seconds:
                self.lease.fence(f"stop {jid}")  # type: ignore[union-attr]
                self.backend.cancel(job)
                x.cancelled = now
                self.event("stop", f"{x.role} job {jid} ({x.service_id}): drained; graceful stop")
            elif x.cancelled is not None and not x.killed and now - x.cancelled > stop_s:
                self.lease.fence(f"kill {jid}")  # type: ignore[union-attr]
                self.backend.kill(job)
                x.killed = True
                self.event("killed", f"{x.role} job {jid} ({x.service_id}) still there {stop_s:.0f}s after its stop: "
                                     "killing it", logging.WARNING)
        for x in list(self._handover):
            svc = by_sid.get(x.service_id)
            if svc is not None and svc.job_id == x.successor:
                gap = max(0.0, svc.started - (x.drain_started or 0.0))
                self.handover_gap[x.role] = round(gap, 1)
                self.metrics.handover_gap.labels(x.role).set(gap)
                self._handover.remove(x)
                self.event("handover", f"{x.role}: {x.service_id} serves again from job {x.successor}, "
                                       f"{gap:.1f}s after job {x.job_id} was deregistered")

    def _draining(self, job_id: str) -> bool:
        x = self.retiring.get(job_id)
        return x is not None and x.drain_started is not None

    def _rollout_status(self, role: str) -> dict | None:
        r = self.rollouts.get(role)
        if r is None or r.target == r.previous:
            return None
        state = "halted" if r.halted else "done" if role in self._rollout_done else "rolling"
        return {"target": r.target, "previous": r.previous, "state": state, "failures": r.failures,
                "max_failures": self.spec.roles[role].max_failures, "reason": r.reason}

