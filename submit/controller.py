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

Succession and rolling upgrades (submit/controller_succession.py; its rules in submit/succession.py,
the upgrade state in submit/rollout.py): a job nearing its earliest walltime signal, or booting an image its role's rollout
replaces, retires: it is not counted, so the plan submits its replacement, and it is drained once
enough of the others are healthy. The spec file is read again when it changes: an edit of a role's
`image:` starts a rollout.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cluster import unfit
from cluster.errors import SalvusError
from cluster.registry import Registry, Service, open_registry
from cluster.registry.lease import CONTROLLER_LEASE, HeldLease, StaleLease, describe, holder_name
from cluster.spec import ClusterSpec
from jobwrappers.probe import probe_once
from submit import open_backend
from submit.base import ACTIVE_STATES, CLEANUP_GRACE_S, Backend, Job
from submit.scale import apply_plan, plan_from, read_desired, registered_ids
from submit.controller_succession import SuccessionMixin
from submit.rollout import Rollout
from submit.succession import Retiring

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


class Controller(SuccessionMixin):
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
        self._placed: dict[str, tuple[str, ...]] = {}  # queued site job -> hosts it was last told to avoid
        self._said_no_successors = False  # the backend cannot queue a persistent role's successor: said once
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
        lease.fence("start successors")
        for line in self.backend.start_successors(queue):
            self.event("succession", line)
        self._forget_departed(queue)
        self._avoid_unfit(queue)
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
        registered = registered_ids(queue, services, self.backend.name)
        self._replace_silent(queue, registered)
        self._escalate(queue)
        self._count_rollout_failures(queue)
        self._retire(queue, services, registered, desired)
        plan = plan_from(desired, self.backend, queue, services, leaving=frozenset(self.leaving),
                         uncounted=self._uncounted())
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
            if self.spec.roles[job.role].network == "site":  # placed as submitted: nothing to re-place
                self._placed[job.job_id] = tuple(self.backend.excluded_hosts(job.role, job.service_id))
            self.event("submitted", f"{job.role} job {job.job_id} ({job.service_id})")
            self.metrics.submissions.labels(job.role).inc()
        self._update_status(desired, queue + submitted, services)

    # --- placement ------------------------------------------------------------------------------
    def _avoid_unfit(self, queue: list[Job]) -> None:
        """Queued site-network jobs avoid the hosts marked unfit now, not only those marked when
        they were submitted: a job the scheduler requeued after a host without the bridge failed it
        (exit 75) keeps its old placement, and a host fixed since must be allowed again."""
        site_roles = {r for r, rs in self.spec.roles.items() if rs.network == "site"}
        waiting = [j for j in queue if j.role in site_roles and j.state == "queued"]
        listed = {j.job_id for j in queue}
        self._placed = {k: v for k, v in self._placed.items() if k in listed}
        if not waiting:
            return
        self.backend.unfit_hosts = [u.host for u in unfit.read(self.spec, self.registry)]
        groups: dict[tuple[str, ...], list[Job]] = {}
        for j in waiting:
            avoid = tuple(self.backend.excluded_hosts(j.role, j.service_id))
            # A job not seen before (submitted by `scale`, or before this controller took the
            # lease) is placed once: what it was submitted with is not known here.
            if self._placed.get(j.job_id) != avoid:
                groups.setdefault(avoid, []).append(j)
        for avoid, jobs in groups.items():
            assert self.lease is not None
            self.lease.fence("re-place queued jobs")
            try:
                if not self.backend.exclude_hosts(jobs, list(avoid)):
                    return
            except SalvusError as e:  # a job started meanwhile: placement is past for it
                log.info("placement: could not update %s: %s", " ".join(j.job_id for j in jobs), e)
                continue
            for j in jobs:
                self._placed[j.job_id] = avoid
            self.event("placement", f"{len(jobs)} queued site job(s) ({' '.join(j.job_id for j in jobs)}) now avoid "
                                    + (", ".join(avoid) if avoid else "no host") + " (hosts marked unfit)")

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
        self._leave(sid, job)

    def _leave(self, sid: str, job: Job) -> None:
        """Cancels `job` to replace it: not counted while it goes, killed after its grace (_escalate)."""
        self.backend.cancel(job)
        self.leaving[sid] = Leaving(job)
        self.metrics.replacements.labels(job.role).inc()

    def _replace_silent(self, queue: list[Job], registered: set[str]) -> None:
        """A job running for its role's boot_timeout (and the clean-up grace, and two cycles) whose
        VM never registered is as good as dead (a wrapper stuck before it registers, a batch step
        killed while the scheduler still says RUNNING): cancelled and replaced like an unhealthy one."""
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
            self._leave(sid, j)

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

    def _walltime_s(self) -> float | None:
        from cluster.spec import parse_walltime

        w = self.spec.scheduler.walltime
        return parse_walltime(w) if w else None
