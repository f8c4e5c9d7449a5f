"""`salvus_jobs controller`: the loop that keeps every role at its desired count.

Every `controller.interval` seconds one cycle: renew (or try to take) the registry's `controller`
lease; standing by while another controller holds it. The leader then lists the queue once (one
scheduler query, no per-job calls), reads the registry once (services, desired counts; the ledger
rides on the plan), lets the host's reaper stop orphans (local executor), probes every registered
service (bounded concurrency, per-probe timeout; `unhealthy_after` failures in a row make it
unhealthy: deregistered, its job cancelled, a replacement submitted), and applies the plan of
`submit.scale` with at most `max_submit` submissions. A surplus is cancelled only once it has lasted
`cancel_after` cycles (hysteresis: a job between two states never makes it submit and cancel in
turn). Every action is fenced by the lease's token (`HeldLease.fence`): a controller that was
paused past its lease resumes, finds its token stale and does nothing. Every decision is one log
line with its reason (`Controller.event`).

Succession and rolling upgrades (submit/succession.py has the rules, submit/rollout.py the upgrade
state): a job nearing its earliest walltime signal, or booting an image its role's rollout
replaces, retires: it is not counted, so the plan submits its replacement, and it is drained once
enough of the others are healthy. The spec file is read again when it changes: an edit of a role's
`image:` starts a rollout.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cluster.errors import SalvusError
from cluster.registry import Registry, Service, open_registry
from cluster.registry.base import DRAINING
from cluster.registry.lease import CONTROLLER_LEASE, HeldLease, StaleLease, describe, holder_name
from cluster.spec import ClusterSpec, load_spec
from jobwrappers.probe import probe_once
from submit import open_backend
from submit.base import ACTIVE_STATES, CLEANUP_GRACE_S, Backend, Job
from submit.rollout import Rollout, current, read_rollouts, write_rollout
from submit.scale import apply_plan, plan_from, read_desired, registered_ids
from submit.succession import Retiring, drainable, due, last_safe_stop, lead_time

log = logging.getLogger("salvus.controller")


@dataclass
class Health:
    """What the prober knows of one registered service."""

    failures: int = 0  # consecutive
    healthy: bool | None = None  # None: not probed yet
    last_error: str = ""
    unhealthy_since: float | None = None


@dataclass
class Leaving:
    """A job the controller cancelled because its service was unhealthy: not counted, and killed
    if it is still there after its role's stop_timeout and the clean-up grace."""

    job: Job
    since: float = field(default_factory=time.monotonic)
    killed: bool = False


class Controller:
    def __init__(self, spec: ClusterSpec, registry: Registry | None = None, backend: Backend | None = None) -> None:
        self.spec = spec
        self.cfg = spec.controller
        self.registry = registry or open_registry(spec)
        self.backend = backend or open_backend(spec)
        self.backend.ledger.use(self.registry)
        self.holder = holder_name("controller")
        self.lease: HeldLease | None = None
        self.health: dict[str, Health] = {}
        self.leaving: dict[str, Leaving] = {}  # by service id
        self.surplus_cycles: dict[str, int] = {}
        self.events: collections.deque[dict] = collections.deque(maxlen=self.cfg.events)
        self.status: dict = {"role": "starting", "holder": self.holder, "roles": {}, "jobs": [], "events": []}
        self.stop = threading.Event()
        self.cycles = 0
        self._first_seen_running: dict[str, float] = {}  # job id -> when first seen running
        self._registered_seen: set[str] = set()  # job ids whose registration was measured
        self.retiring: dict[str, Retiring] = {}  # by job id
        self.to_healthy: dict[str, collections.deque[float]] = {}  # role -> submit-to-healthy seconds
        self._healthy_seen: set[str] = set()  # job ids that were healthy at least once
        self.rollouts: dict[str, Rollout] = {}
        self._failed: dict[str, set[str]] = {}  # role -> job ids counted against its rollout's target
        self._rollout_done: set[str] = set()  # roles whose rollout completion was said
        self.handover_gap: dict[str, float] = {}  # persistent role -> the last hand-over's gap (s)
        self._spec_stamp = self._stamp()
        self._handover: list[Retiring] = []  # persistent predecessors gone, successor not yet registered
        self._drains_adopted = False  # the registry's draining rows taken over since the lease was acquired
        self._pool = ThreadPoolExecutor(max_workers=self.cfg.probe_concurrency, thread_name_prefix="probe")
        from submit.controller_http import Metrics

        self.metrics = Metrics()

    # --- events ---------------------------------------------------------------------------------
    def event(self, kind: str, text: str, level: int = logging.INFO) -> None:
        """One decision, one line: `KIND: what and why`."""
        log.log(level, "%s: %s", kind, text)
        self.events.append({"time": time.time(), "kind": kind, "text": text})
        self.metrics.events.labels(kind).inc()

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        self.event("start", f"controller {self.holder}: interval {self.cfg.interval}s, lease {self.cfg.lease}s, "
                            f"backend {self.backend.name}, registry {self.spec.registry.backend}")
        try:
            while not self.stop.is_set():
                started = time.monotonic()
                self.cycle()
                self.stop.wait(max(0.0, self.cfg.interval - (time.monotonic() - started)))
        finally:
            if self.lease is not None:
                try:
                    self.lease.release()
                    self.event("lease", f"released (token {self.lease.token}) on shutdown")
                except SalvusError as e:
                    log.warning("could not release the lease (it expires by itself): %s", e)
            self._pool.shutdown(wait=False, cancel_futures=True)
            self.registry.close()

    def cycle(self) -> None:
        """One reconciliation; failures of the scheduler or registry are logged and retried next cycle."""
        self.cycles += 1
        try:
            if not self._lead():
                return
            self._reconcile()
        except StaleLease as e:
            self.event("fenced", f"{e}; standing by", logging.WARNING)
            self.lease = None
            self.status["role"] = "standby"
        except SalvusError as e:
            log.warning("cycle %d failed (retried next cycle): %s", self.cycles, e)
            self.metrics.cycle_failures.inc()
        except Exception as e:  # a long-running loop outlives one bad cycle; the details at -v
            log.error("cycle %d failed unexpectedly (retried next cycle): %s: %s", self.cycles, type(e).__name__, e)
            log.debug("cycle %d", self.cycles, exc_info=True)
            self.metrics.cycle_failures.inc()

    def _lead(self) -> bool:
        """Renews the lease, or tries to take it; False while another controller leads."""
        if self.lease is not None and not self.lease.renew():
            self.event("lease", f"lost (token {self.lease.token}): {describe(self.registry.lease(CONTROLLER_LEASE))}",
                       logging.WARNING)
            self.lease = None
        if self.lease is None:
            self.lease = HeldLease.try_acquire(self.registry, CONTROLLER_LEASE, self.holder, self.cfg.lease)
            if self.lease is None:
                info = self.registry.lease(CONTROLLER_LEASE)
                if self.status.get("role") != "standby":
                    self.event("standby", f"lease {describe(info)}")
                self.status = {"role": "standby", "holder": self.holder, "leader": info.holder if info else "",
                               "roles": {}, "jobs": [], "events": list(self.events)}
                self.metrics.leader.set(0)
                return False
            self.event("lease", f"acquired with token {self.lease.token}: this controller acts")
            self._drains_adopted = False
            self.status = {**self.status, "role": "leader", "leader": self.holder, "token": self.lease.token}
        self.metrics.leader.set(1)
        return True

    def _reconcile(self) -> None:
        lease = self.lease
        assert lease is not None
        queue = self.backend.list()  # the cycle's one scheduler query
        services = self.registry.all()  # ... and its registry read (desired counts beside it)
        desired = read_desired(self.spec, self.registry)
        lease.fence("adopt lost submissions")
        self.backend.adopt(queue, forget_unmatched=True)
        lease.fence("reap")
        for line in self.backend.reap():
            self.event("reaped", line)
        self._forget_departed(queue)
        self._fill_images(queue)
        self._follow_spec()
        self._follow_rollouts()
        by_sid = {s.service_id: s for s in services}
        self._probe(services, queue)
        self._measure_healthy(queue)
        for sid, h in list(self.health.items()):
            if h.failures >= self.cfg.unhealthy_after and sid not in self.leaving:
                self._replace_unhealthy(sid, h, by_sid.get(sid), queue)
        if not self._drains_adopted:
            self._adopt_drains(queue)
        self._replace_silent(queue, services)
        self._escalate(queue)
        self._count_rollout_failures(queue)
        self._retire(queue, services, desired)
        plan = plan_from(desired, self.backend, queue, services, leaving=frozenset(self.leaving),
                         uncounted=self._uncounted(queue))
        for rp in plan.roles:
            if rp.cancel:
                self.surplus_cycles[rp.role] = self.surplus_cycles.get(rp.role, 0) + 1
                if self.surplus_cycles[rp.role] < self.cfg.cancel_after:
                    log.debug("%s: surplus of %d for %d cycle(s); waiting for %d", rp.role, len(rp.cancel),
                              self.surplus_cycles[rp.role], self.cfg.cancel_after)
                    rp.cancel = []
            else:
                self.surplus_cycles.pop(rp.role, None)
            for job in rp.gone:
                self.event("gone", f"{rp.role} job {job.job_id} ({job.service_id}) is {job.state}"
                                   f"{': ' + job.hold_reason if job.hold_reason else ''}")
            for job in rp.cancel:
                self.event("cancel", f"{rp.role} job {job.job_id} ({job.service_id}, {job.state}): surplus, "
                                     f"desired {rp.desired}, {len(rp.cancel)} too many for {self.cfg.cancel_after} cycles")
            if rp.submit:
                have = rp.desired - rp.submit
                n = min(rp.submit, self.cfg.max_submit)
                leaving = sum(1 for lv in self.leaving.values() if lv.job.role == rp.role)
                why = f"desired {rp.desired}, have {have}" + (f" ({leaving} unhealthy leaving)" if leaving else "")
                self.event("replace" if leaving or rp.gone else "submit",
                           f"{rp.role}: submitting {n}: {why}" + (f" (at most {self.cfg.max_submit} per cycle)"
                                                                   if n < rp.submit else ""))
        submitted = apply_plan(self.spec, plan, self.backend, lease, max_submit=self.cfg.max_submit)
        for job in submitted:
            self.event("submitted", f"{job.role} job {job.job_id} ({job.service_id})")
            self.metrics.submissions.labels(job.role).inc()
        self._update_status(desired, queue + submitted, services)

    # --- health ---------------------------------------------------------------------------------
    def _probe(self, services: list[Service], queue: list[Job]) -> None:
        """Probes each registered service of a running job once, in parallel."""
        running = {j.service_id or j.job_id for j in queue if j.state == "running"}
        targets = [s for s in services if s.role in self.spec.roles and s.service_id in running
                   and s.service_id not in self.leaving]
        futures = {s.service_id: self._pool.submit(self._probe_one, s) for s in targets}
        role_of = {s.service_id: s.role for s in targets}
        for sid, fut in futures.items():
            error = fut.result()
            h = self.health.setdefault(sid, Health())
            if error is None:
                if h.failures:
                    self.event("recovered", f"{sid} answers its probe again after {h.failures} failure(s)")
                h.failures, h.healthy, h.last_error = 0, True, ""
            else:
                h.failures += 1
                h.last_error = error
                self.metrics.probe_failures.labels(role_of[sid]).inc()
                if h.failures >= self.cfg.unhealthy_after and h.healthy is not False:
                    h.healthy, h.unhealthy_since = False, time.time()
                else:
                    log.info("probe: %s failed (%d of %d): %s", sid, h.failures, self.cfg.unhealthy_after, error)
        live = {s.service_id for s in services}
        for sid in [sid for sid in self.health if sid not in futures and sid not in self.leaving]:
            if sid not in live:
                # Deregistered (its VM died, or it stopped): its job's fate is the plan's.
                job = next((j for j in queue if (j.service_id or j.job_id) == sid), None)
                self.event("deregistered", f"{sid} is no longer registered; its job "
                           + (f"{job.job_id} is {job.state}{': ' + job.hold_reason if job.hold_reason else ''}"
                              if job else "is gone"))
                del self.health[sid]

    def _probe_one(self, s: Service) -> str | None:
        probe = self.spec.roles[s.role].probe
        probe = dataclasses.replace(probe, timeout=min(probe.timeout, self.cfg.probe_timeout))
        try:
            probe_once(s.host, s.port, probe)
            return None
        except OSError as e:
            return str(e) or type(e).__name__

    def _replace_unhealthy(self, sid: str, h: Health, service: Service | None, queue: list[Job]) -> None:
        job = next((j for j in queue if (j.service_id or j.job_id) == sid and j.state in ACTIVE_STATES), None)
        assert self.lease is not None
        self.lease.fence(f"replace unhealthy {sid}")
        self.event("unhealthy", f"{sid} failed {h.failures} probes in a row ({h.last_error}): deregistering, "
                                f"cancelling {'job ' + job.job_id if job else 'nothing (no job found)'}, replacing it",
                   logging.WARNING)
        self.registry.deregister(sid)
        if job is None:
            del self.health[sid]  # nothing of ours to cancel: probed afresh if it registers again
            return
        self.backend.cancel(job)
        self.leaving[sid] = Leaving(job)
        self.metrics.replacements.labels(job.role).inc()

    def _replace_silent(self, queue: list[Job], services: list[Service]) -> None:
        """A job running for its role's boot_timeout (and the clean-up grace, and two cycles) whose
        VM never registered is as good as dead (a wrapper stuck before it registers, a batch step
        killed while the scheduler still says RUNNING): cancelled and replaced like an unhealthy one."""
        registered = registered_ids(queue, services, self.backend.name)
        now = time.time()
        for j in queue:
            sid = j.service_id or j.job_id
            if j.state != "running" or sid in registered or sid in self.leaving or j.job_id in self.retiring:
                continue
            since = j.started or self._first_seen_running.get(j.job_id)
            limit = self.spec.boot_timeout(j.role) + CLEANUP_GRACE_S + 2 * self.cfg.interval
            if since is None or now - since < limit:
                continue
            assert self.lease is not None
            self.lease.fence(f"replace silent {sid}")
            self.event("unregistered", f"{j.role} job {j.job_id} ({sid}) has run {now - since:.0f}s without its VM "
                                       f"registering (boot_timeout {self.spec.boot_timeout(j.role):g}s): cancelling "
                                       "and replacing it", logging.WARNING)
            self.backend.cancel(j)
            self.leaving[sid] = Leaving(j)
            self.metrics.replacements.labels(j.role).inc()

    def _escalate(self, queue: list[Job]) -> None:
        """A cancelled unhealthy job still there after its grace is killed; one that is gone is forgotten."""
        present = {j.job_id: j for j in queue if j.state in ACTIVE_STATES + ("stopping",)}
        for sid, lv in list(self.leaving.items()):
            if lv.job.job_id not in present:
                del self.leaving[sid]
                self.health.pop(sid, None)
                continue
            grace = self.spec.stop_timeout(lv.job.role) + CLEANUP_GRACE_S
            if not lv.killed and time.monotonic() - lv.since > grace:
                assert self.lease is not None
                self.lease.fence(f"kill {lv.job.job_id}")
                self.event("killed", f"{lv.job.role} job {lv.job.job_id} ({sid}) still there {grace:.0f}s after "
                                     "its cancel: killing it", logging.WARNING)
                self.backend.kill(lv.job)
                lv.killed = True

    def _forget_departed(self, queue: list[Job]) -> None:
        listed = {q.job_id for q in queue}
        for job_id in [j for j in self._first_seen_running if j not in listed]:
            del self._first_seen_running[job_id]
        self._registered_seen &= listed
        self._healthy_seen &= listed

    # --- succession and rolling upgrades ----------------------------------------------------------
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
            if j.job_id in self._healthy_seen or self.health.get(sid, Health()).healthy is not True:
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
                and self.health.get(sid, Health()).healthy is True)

    def _uncounted(self, queue: list[Job]) -> frozenset[str]:
        """Retiring jobs (their replacements are due) and successors queued behind a predecessor."""
        out = set()
        for r in self.retiring.values():
            if r.successor:
                out.add(r.successor)
            else:
                out.add(r.job_id)
        return frozenset(out)

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

    def _retire(self, queue: list[Job], services: list[Service], desired: dict[str, int]) -> None:
        """Marks jobs due for succession or upgrade as retiring, drains those that may go, and
        moves drains along (deregistered -> stopped -> killed after the grace)."""
        now = time.time()
        registered = registered_ids(queue, services, self.backend.name)
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
                if not getattr(self, "_said_no_deps", False):
                    self._said_no_deps = True
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

    # --- what /status shows ---------------------------------------------------------------------
    def _update_status(self, desired: dict[str, int], queue: list[Job], services: list[Service]) -> None:
        now = time.time()
        by_sid = {s.service_id: s for s in services}
        walltime = self._walltime_s()
        roles, rows = {}, []
        for role in self.spec.roles:
            mine = [j for j in queue if j.role == role and j.state not in ("done",)]
            registered = registered_ids(mine, services, self.backend.name)
            count = {s: sum(1 for j in mine if j.state == s) for s in ("queued", "running", "held", "stopping", "failed")}
            sids = [j.service_id or j.job_id for j in mine]
            roles[role] = {"desired": desired.get(role, 0), **count, "registered": len(registered),
                           "healthy": sum(1 for sid in sids if self.health.get(sid, Health()).healthy is True),
                           "unhealthy": sum(1 for sid in sids if self.health.get(sid, Health()).healthy is False),
                           "retiring": sum(1 for j in mine if j.job_id in self.retiring),
                           "draining": sum(1 for j in mine if (j.service_id or j.job_id) in self.leaving
                                           or self._draining(j.job_id)),
                           "lead_s": round(self.lead(role), 1),
                           "rollout": self._rollout_status(role),
                           "handover_gap_s": self.handover_gap.get(role)}
            for j in sorted(mine, key=lambda j: j.submitted):
                sid = j.service_id or j.job_id
                h = self.health.get(sid)
                svc = by_sid.get(sid)
                if j.state == "running" and j.job_id not in self._first_seen_running:
                    self._first_seen_running[j.job_id] = now
                    self.metrics.queue_wait.observe(max(0.0, now - j.submitted))
                if svc is not None and j.job_id not in self._registered_seen:
                    self._registered_seen.add(j.job_id)
                    self.metrics.boot_to_registered.observe(max(0.0, svc.started - j.submitted))
                age = now - j.submitted
                earliest = self.backend.earliest_signal(j)
                retiring = self.retiring.get(j.job_id)
                rows.append({"job_id": j.job_id, "role": role, "state": j.state, "service_id": sid,
                             "endpoint": svc.endpoint if svc else "", "registered": svc is not None,
                             "image": j.image, "retiring": retiring.reason if retiring else "",
                             "health": ("draining" if sid in self.leaving or self._draining(j.job_id)
                                        else "unknown" if h is None or h.healthy is None
                                        else "healthy" if h.healthy else "unhealthy"),
                             "probe_failures": h.failures if h else 0, "hold_reason": j.hold_reason,
                             "age": round(age, 1),
                             "time_left": (round(earliest - now, 1) if earliest is not None
                                           else round(walltime - age, 1) if walltime else None)})
        lease = self.lease
        self.status = {"role": "leader", "holder": self.holder, "leader": self.holder,
                       "token": lease.token if lease else None, "backend": self.backend.name,
                       "interval": self.cfg.interval, "updated": now, "cycles": self.cycles,
                       "roles": roles, "jobs": rows, "events": list(self.events)}
        self.metrics.update(roles)

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

    def _walltime_s(self) -> float | None:
        from cluster.spec import parse_walltime

        w = self.spec.scheduler.walltime
        return parse_walltime(w) if w else None
