"""`scale`, `status`, `stop`: reconcile desired counts per role with what the scheduler reports.

The plan is computed from one query of the queue (all roles at once, so 2,000 jobs are one
`squeue`), the registry (which jobs' VMs are registered and healthy) and our ledger (jobs we
launched that the queue no longer shows). Applying it cancels the surplus — held and queued before
running, never-registered before registered, newest first — and submits the shortfall. Held jobs
count as capacity: they are reported with their hold reason, never silently replaced. A job the
scheduler reports failed or gone whose VM still heartbeats counts as present too (a local job whose
supervisor was killed): replacing it would start a duplicate; the reaper stops it instead.

Desired counts and the ledger live in the registry, and one reconciler acts at a time: `scale`
takes the registry's `controller` lease for its run. When a `salvus_jobs controller` holds it,
`scale` only records the desired counts and the controller acts on them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from typing import Iterator

from cluster import jobstatus, unfit
from cluster.errors import RegistryUnavailable, SpecError, TempFailure
from cluster.registry import Registry, Service, open_registry
from cluster.registry.lease import CONTROLLER_LEASE, HeldLease, holder_kind, holder_name
from cluster.spec import MAX_ROLE_COUNT, ClusterSpec
from cluster.store import Store
from submit import open_backend
from submit.base import ACTIVE_STATES, Backend, Job
from submit.rollout import current, read_rollouts

log = logging.getLogger(__name__)


@dataclass
class RolePlan:
    role: str
    desired: int
    jobs: list[Job] = field(default_factory=list)  # what the queue shows for this role
    gone: list[Job] = field(default_factory=list)  # ours, finished or no longer in the queue
    registered: set[str] = field(default_factory=set)  # service ids live in the registry
    submit: int = 0
    cancel: list[Job] = field(default_factory=list)

    def count(self, state: str) -> int:
        return sum(1 for j in self.jobs if j.state == state)

    @property
    def held(self) -> list[Job]:
        return [j for j in self.jobs if j.state == "held"]


@dataclass
class ScalePlan:
    backend: str
    roles: list[RolePlan]
    controller: str = ""  # the controller holding the lease: it acts, this plan only recorded counts

    @property
    def noop(self) -> bool:
        return not any(r.submit or r.cancel for r in self.roles)

    def describe(self) -> list[str]:
        if self.controller:
            return [f"{r.role}: desired {r.desired}" for r in self.roles]
        lines = []
        for r in self.roles:
            have = sum(r.count(s) for s in ACTIVE_STATES)
            action = (f"submit {r.submit}" if r.submit else
                      f"cancel {len(r.cancel)} ({', '.join(f'{j.job_id}:{j.state}' for j in r.cancel)})"
                      if r.cancel else "no change")
            lines.append(f"{r.role}: desired {r.desired}, have {have} (queued {r.count('queued')}, "
                         f"running {r.count('running')}, held {r.count('held')}, registered "
                         f"{len(r.registered)}) -> {action}")
            lines += [f"  held {j.job_id} ({j.service_id or '-'}): {j.hold_reason or 'no reason given'}"
                      for j in r.held]
            lines += [f"  gone {j.job_id} ({j.service_id or '-'}): {j.state}"
                      f"{': ' + j.hold_reason if j.hold_reason else ''}" for j in r.gone]
        return lines


def live_services(spec: ClusterSpec) -> list[Service]:
    """The registry's live services; a registry that is down plans as if none were registered."""
    try:
        with open_registry(spec) as registry:
            return registry.all()
    except RegistryUnavailable as e:
        log.warning("registry unavailable, treating every job as not registered: %s", e)
        return []


def registered_ids(jobs: list[Job], services: list[Service], backend: str) -> set[str]:
    """Service ids of `jobs` whose VM is registered (by service id, or scheduler + job id)."""
    by_sid = {s.service_id for s in services}
    by_job = {(s.scheduler, s.job_id) for s in services}
    return {j.service_id or j.job_id for j in jobs
            if j.service_id in by_sid or (backend, j.job_id) in by_job}


def cancel_order(jobs: list[Job], registered: set[str]) -> list[Job]:
    """Which jobs go first when there are too many: held and queued before running, then
    never-registered before registered; newest first within each group."""
    def group(j: Job) -> int:
        return 0 if j.state in ("held", "queued") else (1 if (j.service_id or j.job_id) not in registered else 2)

    def age_key(j: Job) -> tuple:
        # Submit times can tie (Slurm reports whole seconds): a later job id is the newer job.
        return (j.submitted, len(j.job_id), j.job_id)

    newest_first = sorted(jobs, key=age_key, reverse=True)
    return sorted(newest_first, key=group)  # stable: newest first within each group


def parse_desired(spec: ClusterSpec, items: list[str]) -> dict[str, int]:
    """`["sage=2", "hub=1"]` -> counts; no items means every role's `count` from the spec."""
    if not items:
        return {name: r.count for name, r in spec.roles.items()}
    desired: dict[str, int] = {}
    for item in items:
        role, sep, n = item.partition("=")
        # ASCII digits only: str.isdigit() accepts '²', which int() then refuses.
        if not sep or not re.fullmatch(r"[0-9]{1,9}", n.strip()):
            raise SpecError(f"scale: expected ROLE=N with N a whole number, got {item!r}")
        spec.role(role)
        if role in desired:
            raise SpecError(f"scale: {role} given twice ({role}={desired[role]} and {item}): give each role once")
        if int(n) > MAX_ROLE_COUNT:
            raise SpecError(f"scale: {item}: at most {MAX_ROLE_COUNT} services per role")
        desired[role] = int(n)
    return desired


def plan_scale(spec: ClusterSpec, desired: dict[str, int], backend: Backend | None = None,
               services: list[Service] | None = None, adopt: bool = True) -> ScalePlan:
    """The plan from one listing of the queue; `adopt` (under the lease) settles lost submissions."""
    backend = backend or open_backend(spec)
    for role, n in desired.items():
        spec.role(role)
        if n < 0:
            raise SpecError(f"scale: {role}: count must be 0 or more, got {n}")
    queue = backend.list()
    if adopt:
        backend.adopt(queue, forget_unmatched=True)  # before reading our records: they count as ours
    services = live_services(spec) if services is None else services
    return plan_from(desired, backend, queue, services)


def still_heartbeating(job: Job, services: list[Service], backend: str) -> bool:
    return bool(registered_ids([job], services, backend))


def plan_from(desired: dict[str, int], backend: Backend, queue: list[Job], services: list[Service],
              leaving: frozenset[str] = frozenset(), uncounted: frozenset[str] = frozenset()) -> ScalePlan:
    """The plan for `queue` and `services` as read; jobs in `leaving` (by service id: unhealthy,
    being replaced) and in `uncounted` (by job id: retiring, or a persistent role's successor queued
    behind its predecessor) are not counted."""
    recorded = backend.recorded_ids()
    plans = []
    for role, n in desired.items():
        listed = [j for j in queue if j.role == role]
        rp = RolePlan(role, n)
        # A job the scheduler calls finished while its VM still heartbeats is not gone: counting
        # it out would start a duplicate beside it.
        alive = [j if j.state not in ("done", "failed") else
                 dataclasses.replace(j, state="running", hold_reason=f"the scheduler says {j.state}, "
                                     "but its VM still heartbeats")
                 for j in listed if j.state not in ("done", "failed") or still_heartbeating(j, services, backend.name)]
        rp.jobs = alive
        # Finished jobs the queue still shows are news only once: while they are in our records.
        rp.gone = [j for j in listed if j.state in ("done", "failed") and j.job_id in recorded
                   and not still_heartbeating(j, services, backend.name)] \
            + [j for j in backend.known_but_not_listed(role, listed) if not still_heartbeating(j, services, backend.name)]
        active = [j for j in rp.jobs if j.state in ACTIVE_STATES and (j.service_id or j.job_id) not in leaving
                  and j.job_id not in uncounted]
        rp.registered = registered_ids(rp.jobs, services, backend.name)
        if n > len(active):
            rp.submit = n - len(active)
        elif n < len(active):
            rp.cancel = cancel_order(active, rp.registered)[:len(active) - n]
        plans.append(rp)
    return ScalePlan(backend.name, plans)


DESIRED = "desired"  # the registry's state kind: role -> count


def read_desired(spec: ClusterSpec, registry: Registry) -> dict[str, int]:
    """The counts the last `scale` asked for; the spec's `count` for roles never scaled."""
    counts = {name: r.count for name, r in spec.roles.items()}
    _move_legacy_desired(spec, registry)
    for role, value in registry.read_state(DESIRED).items():
        # Registry rows are anyone's writing: a role of this spec and a plain count only.
        if role in counts and re.fullmatch(r"[0-9]{1,9}", value) and int(value) <= MAX_ROLE_COUNT:
            counts[role] = int(value)
    return counts


def _move_legacy_desired(spec: ClusterSpec, registry: Registry) -> None:
    """An older version kept the counts in STORE/state/desired.json: moved into the registry once.
    Only a plain file of our own is believed (job users may write `state/`)."""
    path = Store.of(spec).runtime.desired
    try:
        st = os.lstat(path)
        saved = json.loads(path.read_text()) if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() else {}
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        saved = {}
    if isinstance(saved, dict):
        have = registry.read_state(DESIRED)
        for role, n in saved.items():
            if role in spec.roles and type(n) is int and 0 <= n <= MAX_ROLE_COUNT and role not in have:
                registry.write_state(DESIRED, role, str(n))
    try:
        path.unlink()
        log.info("moved %s into the registry", path)
    except OSError as e:
        log.warning("could not remove %s (already in the registry): %s", path, e.strerror or e)


def record_desired(registry: Registry, desired: dict[str, int], lease: HeldLease | None = None) -> None:
    for role, n in desired.items():
        if lease is not None:
            lease.fence(f"record {role}={n}")
        registry.write_state(DESIRED, role, str(n))


SCALE_LEASE_TTL = 60  # a one-shot `scale` renews it while it works (HeldLease.fence)
SCALE_WAIT_S = 600.0


@contextlib.contextmanager
def reconciler_lease(registry: Registry, wait: float = SCALE_WAIT_S) -> Iterator[HeldLease | str]:
    """The `controller` lease for one `scale`/`stop` run, or, when a controller holds it, that
    controller's name (it acts; the caller only records). Another `scale` holding it is waited for
    (up to `wait` seconds, then TempFailure), as the per-store lock file was."""
    me = holder_name("scale")
    deadline = time.monotonic() + wait
    while True:
        lease = HeldLease.try_acquire(registry, CONTROLLER_LEASE, me, SCALE_LEASE_TTL)
        if lease is not None:
            break
        info = registry.lease(CONTROLLER_LEASE)
        if info is not None and holder_kind(info.holder) == "controller":
            yield info.holder
            return
        if time.monotonic() >= deadline:
            raise TempFailure(f"scale: {info.holder if info else 'another scale'} has held the lease for "
                              f"{wait:.0f}s; try again later")
        time.sleep(0.5)
    try:
        yield lease
    finally:
        try:
            lease.release()
        except RegistryUnavailable as e:
            log.warning("could not release the lease (it expires in %ds): %s", lease.ttl, e)


def apply_plan(spec: ClusterSpec, plan: ScalePlan, backend: Backend | None = None,
               lease: HeldLease | None = None, registry: Registry | None = None,
               max_submit: int | None = None) -> list[Job]:
    """Cancels and submits what `plan` says (at most `max_submit` jobs); returns the jobs
    submitted. Does not wait. With `lease`, every action is fenced first (StaleLease)."""
    backend = backend or open_backend(spec, plan.backend)
    submitted: list[Job] = []
    for rp in plan.roles:
        for job in rp.gone:
            backend.forget(job)
        for job in rp.cancel:
            if lease is not None:
                lease.fence(f"cancel {job.job_id}")
            log.info("cancelling %s job %s (%s, %s)", backend.name, job.job_id, job.role, job.state)
            backend.cancel(job)
        n = rp.submit if max_submit is None else min(rp.submit, max(0, max_submit - len(submitted)))
        if n:
            if lease is not None:
                lease.fence(f"submit {n} {rp.role}")
            submitted += backend.submit(rp.role, n)
    if registry is not None:
        record_desired(registry, {rp.role: rp.desired for rp in plan.roles}, lease)
    return submitted


def scale(spec: ClusterSpec, desired: dict[str, int], dry_run: bool = False) -> tuple[ScalePlan, list[Job]]:
    """plan + apply holding the lease (the CLI's and `demo`'s entry point). When a controller
    holds it, the counts are recorded for it and the plan says which controller acts."""
    for role, n in desired.items():
        spec.role(role)
        if n < 0:
            raise SpecError(f"scale: {role}: count must be 0 or more, got {n}")
    Store.of(spec).open()  # refuses a store a newer version wrote before anything is changed
    backend = open_backend(spec)
    with open_registry(spec) as registry, contextlib.closing(backend.ledger):
        backend.ledger.use(registry)
        with reconciler_lease(registry) as lease:
            if isinstance(lease, str):
                # The controller acts on the counts: no scheduler query here (it may be unreachable
                # from this machine while the controller's is fine).
                if not dry_run:
                    record_desired(registry, desired)
                return ScalePlan(backend.name, [RolePlan(r, n) for r, n in desired.items()], controller=lease), []
            rollouts = read_rollouts(spec, registry)
            backend.images = {r: current(spec, r, rollouts).image for r in spec.roles}
            plan = plan_scale(spec, desired, backend, services=registry.all())
            return plan, ([] if dry_run else apply_plan(spec, plan, backend, lease, registry))


def stop_roles(spec: ClusterSpec, roles: list[str], wait: bool = True, timeout: float | None = None) -> list[Job]:
    """Cancels every job of `roles` and, with `wait`, returns once their wrappers are gone
    (guest shut down, deregistered). Jobs still there after `timeout` are killed; if even that
    fails, TempFailure names them."""
    for role in roles:
        spec.role(role)
    Store.of(spec).open()
    backend = open_backend(spec)
    timeout = timeout if timeout is not None else max((spec.stop_timeout(r) for r in roles), default=spec.hypervisor.stop_timeout) + 40
    with open_registry(spec) as registry:
        backend.ledger.use(registry)
        with reconciler_lease(registry) as lease:
            # With a controller running, the counts go to 0 first so it submits nothing more; the
            # cancels are ours even so: `stop` is the operator's brake and waits for the VMs.
            record_desired(registry, {r: 0 for r in roles}, lease if isinstance(lease, HeldLease) else None)
            backend.reap(roles)  # wrappers whose supervisor is gone are stopped too
            jobs = [j for j in backend.list() if j.role in roles]
            for job in jobs:
                if job.state in ACTIVE_STATES:
                    backend.cancel(job)
                elif job.state in ("done", "failed"):
                    backend.forget(job)
        backend.ledger.close()
    targets = [j for j in jobs if j.state in ACTIVE_STATES + ("stopping",)]
    if not wait or not targets:
        return targets
    left = backend.wait_gone(targets, timeout)
    if left:
        log.warning("%d job(s) still there after %.0fs; killing: %s", len(left), timeout,
                    " ".join(j.job_id for j in left))
        for job in left:
            backend.kill(job)
        left = backend.wait_gone(left, 15)
        if left:
            raise TempFailure(f"stop: {len(left)} job(s) did not go away: "
                              f"{' '.join(j.job_id for j in left)}")
    for job in backend.list():
        if job.job_id in {t.job_id for t in targets} and job.state in ("done", "failed"):
            backend.forget(job)
    return targets


def job_endpoint(spec: ClusterSpec, job: Job, services: dict[str, Service]) -> str:
    """Where the job's service answers: the registry, else the wrapper's status file."""
    sid = job.service_id or ""
    if sid in services:
        return services[sid].endpoint
    status = jobstatus.read(Store.of(spec), sid) if sid else None
    return status.endpoint if status else ""


def status_report(spec: ClusterSpec) -> dict:
    """Per role desired/queued/running/held/stopping/registered, and every job with its endpoint."""
    backend = open_backend(spec)
    with open_registry(spec) as registry:
        backend.ledger.use(registry)
        listed = backend.list()
        backend.adopt(listed)  # unmatched submissions are left to `scale`, which holds the lease
        services = {s.service_id: s for s in registry.all()}
        desired = read_desired(spec, registry)
        unfit_rows = unfit_report(spec, registry)
        backend.ledger.close()
    jobs = [j for j in listed if j.state not in ("done",)]
    now = time.time()
    roles = {}
    for role in spec.roles:
        mine = [j for j in jobs if j.role == role]
        roles[role] = {"desired": desired.get(role, 0),
                       **{s: sum(1 for j in mine if j.state == s) for s in ("queued", "running", "held", "stopping", "failed")},
                       "registered": sum(1 for s in services.values() if s.role == role)}
    rows = []
    for j in sorted(jobs, key=lambda j: (j.role, j.submitted)):
        rows.append({**dataclasses.asdict(j), "endpoint": job_endpoint(spec, j, services),
                     "registered": (j.service_id or "") in services, "age": round(now - j.submitted, 1)})
    return {"backend": backend.name, "roles": roles, "jobs": rows, "unfit_hosts": unfit_rows}


def unfit_report(spec: ClusterSpec, registry: Registry) -> list[dict]:
    """The hosts marked unfit for site jobs, as `status` shows them (cluster/unfit.py)."""
    return [dataclasses.asdict(u) for u in unfit.read(spec, registry)]
