"""What every scheduler backend shares: the Job record, the job's resources, the Backend interface
with the one submit loop, the job-script template rendering and the ledger of jobs we submitted.

Like dask-jobqueue's JobQueueCluster/Job split and Parsl's ExecutionProvider: a backend only knows
its own job description, how to submit one job, its query/cancel commands and how to parse their
output; counting, planning and waiting live in `submit.scale` and work the same for every scheduler.
Client commands run through the backend's `runner` (submit/runner.py), never directly.
"""
from __future__ import annotations

import abc
import dataclasses
import getpass
import json
import logging
import math
import os
import pwd
import re
import shlex
import shutil
import stat
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Iterable, Mapping

from cluster import unfit
from cluster.errors import EXIT_CONFIG, EXIT_DATAERR, EXIT_TEMPFAIL, SchedulerError, SpecError
from cluster.spec import ClusterSpec, RoleSpec, parse_walltime
from cluster.store import Store
from cluster.yamlmodel import is_service_id, split_image_ref
from submit.runner import CommandResult, CommandRunner, runner_for

if TYPE_CHECKING:
    from cluster.registry import Registry

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"

# Job states every backend maps its own onto. `stopping`: cancelled (or told to stop) but the
# wrapper is still shutting its guest down; not counted as capacity, not cancelled again.
STATES = ("queued", "running", "held", "stopping", "done", "failed", "unknown")
ACTIVE_STATES = ("queued", "running", "held")

# The wrapper's exit codes (ARCHITECTURE.md) as the backends' retry policy sees them.
EXIT_RETRY = EXIT_TEMPFAIL
EXIT_HOLD = (EXIT_DATAERR, EXIT_CONFIG)

# Memory QEMU needs beside the guest's own (TCG code buffer, device model): added to every job's
# memory request so the scheduler's limit never kills a VM that stays within its guest memory.
QEMU_OVERHEAD_MB = 256
# Time a wrapper needs after the guest stopped: destroy it, deregister, clean scratch up.
CLEANUP_GRACE_S = 15

# The submitter's environment variables a job is given; nothing else of it reaches a job (not
# SALVUS_KEY_PASSPHRASE, cloud credentials, tokens). What a login shell and the wrapper need: the
# program search path (PYTHONPATH too, so the job runs the code the submitter runs), home and user,
# locale (LANG, LC_*) and scratch (TMPDIR). The wrapper's own variables (SALVUS_SPEC, SALVUS_VMJOB,
# SALVUS_SERVICE_ID, SALVUS_SCHEDULER) are set by `Backend.job_env`, never taken from the
# submitter; the scheduler adds its own (SLURM_*, PBS_*, JOB_ID, _CONDOR_*) on the execute node.
JOB_ENV_NAMES = ("PATH", "PYTHONPATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR")
JOB_ENV_PREFIXES = ("LC_",)


@dataclass
class Job:
    job_id: str
    role: str
    state: str  # one of STATES
    service_id: str | None
    submitted: float  # epoch seconds
    hold_reason: str = ""
    backend: str = ""
    token: str = ""  # the submission's token, when the scheduler shows it (see Ledger.intend)
    # When the current run started (epoch; None while queued) and its time limit as the scheduler
    # holds it (seconds; None: unlimited or not shown): the controller's walltime clock.
    started: float | None = None
    walltime_s: float | None = None
    image: str = ""  # the NAME@VERSION the job boots (--image), when the scheduler or our records show it
    ended_by: str = ""  # for a finished job: "walltime", "cancel", "exit" (its own), "" unknown
    after: str = ""  # the job a successor waits for (submit_successor), when our records show it

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def wrapper_path(spec: ClusterSpec) -> str:
    """The `salvus-vmjob` execute nodes run: the spec's choice, else the one installed beside us."""
    if spec.scheduler.wrapper:
        return spec.scheduler.wrapper
    beside = Path(sys.executable).parent / "salvus-vmjob"
    if beside.exists():
        return str(beside)
    found = shutil.which("salvus-vmjob")
    if not found:
        raise SpecError("scheduler.wrapper: salvus-vmjob is not installed beside this Python nor on "
                        "PATH; set scheduler.wrapper to its path on the execute nodes")
    return found


def submitting_account(spec: ClusterSpec) -> str:
    """The account this process's submissions run under: the login node's user over SSH (as
    cluster/ssh.py logs in), else this process's effective user."""
    if spec.scheduler.login is not None:
        return spec.scheduler.login.user or getpass.getuser()
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        raise SpecError(f"{spec.source}: scheduler.submit_user: uid {os.geteuid()} has no user name "
                        "here; set scheduler.submit_user") from None


def job_environment(environ: Mapping[str, str], **values: str) -> dict[str, str]:
    """A job's environment: the allowlisted part of `environ` (the submitter's), then `values`
    (the wrapper's own variables)."""
    allowed = {k: v for k, v in environ.items() if k in JOB_ENV_NAMES or k.startswith(JOB_ENV_PREFIXES)}
    return {**allowed, **values}


@dataclass(frozen=True)
class JobResources:
    """What one VM's job asks the scheduler for, computed once from the spec for every backend."""

    cpus: int
    memory_mb: int  # the guest's memory plus QEMU_OVERHEAD_MB
    disk_mb: int  # scratch for the overlay and config drive
    grace_s: int  # SIGTERM -> SIGKILL: the guest's shutdown bound plus CLEANUP_GRACE_S
    # The spec's walltime parsed (cluster.spec.parse_walltime); each backend renders its own form
    # from it (Slurm D-HH:MM:SS, PBS HH:MM:SS, HTCondor and SGE seconds). None: unlimited.
    walltime_s: int | None

    @classmethod
    def of(cls, spec: ClusterSpec, role: str) -> "JobResources":
        r = spec.role(role)
        walltime = spec.scheduler.walltime
        return cls(cpus=r.vcpus, memory_mb=r.memory_mb + QEMU_OVERHEAD_MB, disk_mb=max(r.disk_mb, 1),
                   grace_s=math.ceil(spec.stop_timeout(role)) + CLEANUP_GRACE_S,
                   walltime_s=parse_walltime(walltime) if walltime else None)


def clock_time(seconds: int) -> str:
    """HH:MM:SS, hours unbounded (PBS/Torque's walltime form; Torque refuses Slurm's D-)."""
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def checked_service_id(service_id: str | None) -> str | None:
    """A service id given to `render`/`submit` is baked into job scripts: refuse anything else."""
    if service_id is not None and not is_service_id(service_id):
        raise SpecError(f"--service-id: expected letters, digits, '_', '.', '-' (at most 64, no '..'), "
                        f"got {service_id!r}")
    return service_id


class Ledger:
    """Jobs this site submitted through one backend, so `scale` and the controller can notice jobs
    the queue no longer shows (finished or removed behind our back) and DRMAA, which cannot list a
    queue, knows what to ask about. The rows live in the registry (`ledger:BACKEND`, and
    `pending:BACKEND` for submissions under way), so every controller of the site sees the same
    ledger; files an older version kept under STORE/state/submitted/BACKEND/ are moved in once."""

    def __init__(self, spec: ClusterSpec, backend: str, registry: "Registry | None" = None) -> None:
        self.spec = spec
        self.dir = Store.of(spec).runtime.submitted_dir(backend)  # DRMAA's cancel marks, legacy files
        self.pending = Store.of(spec).runtime.pending_dir(backend)
        self.kind, self.pending_kind = f"ledger:{backend}", f"pending:{backend}"
        self._registry = registry
        self._owned = False

    @property
    def registry(self) -> "Registry":
        if self._registry is None:
            from cluster.registry import open_registry

            self._registry, self._owned = open_registry(self.spec), True
            self._move_legacy_files()
        return self._registry

    def use(self, registry: "Registry") -> None:
        """Shares the caller's open registry (one connection per process, not one per ledger)."""
        if self._registry is None:
            self._registry = registry
            self._move_legacy_files()

    def close(self) -> None:
        if self._owned and self._registry is not None:
            self._registry.close()
        self._registry, self._owned = None, False

    def _move_legacy_files(self) -> None:
        for directory, kind, key in ((self.dir, self.kind, "job_id"), (self.pending, self.pending_kind, "token")):
            for p in sorted(directory.glob("*.json")) if directory.is_dir() else []:
                try:
                    st = os.lstat(p)
                    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                        raise TypeError  # job users may write state/: only our own files are believed
                    d = json.loads(p.read_text())
                    self._registry.write_state(kind, str(d[key]), json.dumps(d))
                    log.info("ledger: moved %s into the registry", p)
                except (ValueError, TypeError, KeyError):
                    log.warning("ledger: dropping legacy entry %s (unreadable, or not ours)", p)
                except OSError:
                    continue
                try:
                    p.unlink()
                except OSError as e:
                    log.warning("ledger: could not remove %s: %s", p, e.strerror or e)

    def add(self, job: Job, **extra: object) -> None:
        self.registry.write_state(self.kind, job.job_id, json.dumps({**job.to_dict(), **extra}))

    def forget(self, job_id: str) -> None:
        self.registry.write_state(self.kind, job_id, None)

    def intend(self, role: str, service_id: str | None) -> str:
        """Records a submission before it is made and returns its token: if the connection drops
        after the scheduler accepted the job but before we read its id, the next listing finds
        the job by this token (`Backend.adopt`) instead of a second one being submitted."""
        token = uuid.uuid4().hex[:16]
        self.registry.write_state(self.pending_kind, token, json.dumps(
            {"token": token, "role": role, "service_id": service_id, "submitted": time.time()}))
        return token

    def intents(self) -> list[dict]:
        out = []
        for key, value in sorted(self.registry.read_state(self.pending_kind).items()):
            try:
                d = json.loads(value)
                out.append({"token": str(d["token"]), "role": str(d["role"]), "service_id": d.get("service_id")})
            except (ValueError, TypeError, KeyError):
                log.warning("ignoring unreadable pending submission %r", key)
        return out

    def settle(self, token: str) -> None:
        self.registry.write_state(self.pending_kind, token, None)

    def jobs(self) -> list[Job]:
        return parse_ledger(self.registry.read_state(self.kind))


def parse_ledger(rows: dict[str, str]) -> list[Job]:
    """Ledger rows as Jobs (registry rows are anyone's writing: fields are checked, bad rows skipped)."""
    out: list[Job] = []
    for key, value in sorted(rows.items()):
        try:
            d = json.loads(value)
            job = Job(**{f.name: d[f.name] for f in dataclasses.fields(Job) if f.name in d})
            if not (isinstance(job.job_id, str) and isinstance(job.role, str) and isinstance(job.state, str)
                    and isinstance(job.submitted, (int, float))):
                raise TypeError
            if not (isinstance(job.after, str) and re.fullmatch(r"[\w.-]{0,64}", job.after)):
                job.after = ""  # a job id only: backends ask their scheduler about it
            out.append(job)
        except (ValueError, TypeError, KeyError):
            log.warning("ignoring unreadable ledger entry %r", key)
    return out


class Backend(abc.ABC):
    """One scheduler. Subclasses set `name`, render a job description from a template, submit one
    job, and list/cancel with the scheduler's own commands (through `self.runner`) or API."""

    name: str = ""
    # Phrases in a client's error output that mean the scheduler's daemon could not be reached.
    unreachable_hints: tuple[str, ...] = ()
    # The scheduler shows a submission's token in its listing (Job.token): submit_one takes one.
    tokens: bool = False
    # How much earlier than its job's --signal lead the scheduler may signal it (Slurm: up to 60 s).
    signal_slack_s: float = 0.0
    # The scheduler can queue a job to start once another has ended (submit_successor).
    dependencies: bool = False

    def __init__(self, spec: ClusterSpec, runner: CommandRunner | None = None) -> None:
        self.spec = spec
        self.runner = runner or runner_for(spec, self.name)
        self.ledger = Ledger(spec, self.name)
        # Per role, the image new jobs boot when it is not the spec's: a rollout's (submit/rollout.py).
        self.images: dict[str, str] = {}
        # Hosts marked unfit for site jobs (cluster/unfit.py), read at each submission.
        self.unfit_hosts: list[str] = []

    @property
    def submit_user(self) -> str:
        """Whose jobs are ours (with this site's job names): `scheduler.submit_user`, else the
        submitting account. Every `list` shows only that user's jobs, so another user's
        look-alikes (same job name, a `salvus:` comment or `Salvus*` attributes) are never counted
        nor cancelled: Slurm `squeue --user`, PBS the `Job_Owner`, HTCondor `Owner`; DRMAA asks
        only about its ledger's jobs, the local executor reads only that user's records."""
        return self.spec.scheduler.submit_user or submitting_account(self.spec)

    def check_submitter(self) -> None:
        """Refuses to submit as another account than `submit_user`: such jobs would not be
        listed as ours, and every `scale` would submit them again."""
        account = submitting_account(self.spec)
        if account != self.submit_user:
            raise SpecError(f"{self.spec.source}: scheduler.submit_user is {self.submit_user!r} but jobs "
                            f"submitted here run as {account!r}: run as {self.submit_user} (or change "
                            "scheduler.submit_user)")

    # --- what a backend implements -------------------------------------------------------------
    @abc.abstractmethod
    def render(self, role: str, service_id: str | None = None) -> str:
        """The job description a user could submit by hand (runs one VM of `role`)."""

    @abc.abstractmethod
    def submit_one(self, role: str, service_id: str | None) -> str:
        """Queues one job of `role` (its stable service id, or None: ROLE-JOBID); returns its job id.
        A backend with `tokens` takes a third argument, the token the job must carry; one with
        `dependencies` an `after` keyword, the job id it must wait for (submit_successor)."""

    @abc.abstractmethod
    def list(self, role: str | None = None) -> list[Job]:
        """This site's jobs the scheduler knows about (all roles when `role` is None): only
        `submit_user`'s, never another user's with the same names."""

    @abc.abstractmethod
    def cancel(self, job: Job) -> None:
        """Asks the scheduler to stop `job` (SIGTERM first, so the guest shuts down cleanly)."""

    # --- the submit loop, the same for every scheduler ------------------------------------------
    def submit(self, role: str, n: int) -> list[Job]:
        """Queues `n` jobs of `role`, one at a time; returns them as the scheduler named them."""
        self.prepare_submit(role)
        return [self.submit_job(role, sid) for sid in self.stable_service_ids(role, n)]

    def submit_job(self, role: str, sid: str | None, after: str = "") -> Job:
        """Queues and records one job (after `after` has ended, if given: backends with
        `dependencies` take it as submit_one's `after` keyword)."""
        extra = {"after": after} if after else {}
        if self.tokens:
            # A failure leaves the intent: whether the scheduler took the job is for the
            # next listing to say (adopt).
            token = self.ledger.intend(role, sid)
            job = self.new_job(role, sid, self.submit_one(role, sid, token, **extra))
            job.token = token
        else:
            job = self.new_job(role, sid, self.submit_one(role, sid, **extra))
        job.after = after
        self.record(job)  # at once: a failure on the next one never resubmits this one
        if job.token:
            self.ledger.settle(job.token)
        log.info("%s job %s: %s %s%s", self.name, job.job_id, role, job.service_id,
                 f" (after job {after})" if after else "")
        return job

    def prepare_submit(self, role: str) -> None:
        """Checks and directories a submission needs once, before its first job."""
        self.role(role)
        self.check_submitter()
        self.runner.make_dirs(self.log_dir())  # where the jobs run: on the login node's side
        if self.role(role).network == "site":
            self.unfit_hosts = [u.host for u in unfit.read(self.spec, self.ledger.registry)]
            if self.unfit_hosts:
                log.info("%s jobs avoid the hosts marked unfit: %s", role, ", ".join(self.unfit_hosts))

    def new_job(self, role: str, service_id: str | None, job_id: str) -> Job:
        return Job(job_id, role, "queued", service_id or self.default_service_id(role, job_id),
                   time.time(), backend=self.name, image=self.job_image(role))

    def default_service_id(self, role: str, job_id: str) -> str:
        """The id of a job without a stable one, as its job script computes it: ROLE-JOBID."""
        return f"{role}-{job_id}"

    def record(self, job: Job) -> None:
        self.ledger.add(job)

    def adopt(self, listed: list[Job], forget_unmatched: bool = False) -> list[Job]:
        """Records the jobs of submissions whose id we never read (the connection dropped after
        the scheduler took them), found in `listed` by their token; returns them. With
        `forget_unmatched` (under the scale lock), a submission the queue does not show never
        reached the scheduler (or has long gone) and is forgotten."""
        by_token = {j.token: j for j in listed if j.token}
        adopted = []
        for intent in self.ledger.intents():
            job = by_token.get(intent["token"])
            if job is not None:
                log.info("%s job %s: adopted (%s %s, submitted while the connection dropped)",
                         self.name, job.job_id, job.role, job.service_id)
                self.record(job)
                adopted.append(job)
            elif forget_unmatched:
                log.warning("%s: a submission of %s (token %s) is not in the queue: it never reached "
                            "the scheduler or has long gone", self.name, intent["role"], intent["token"])
            else:
                continue
            self.ledger.settle(intent["token"])
        return adopted

    def signal_lead_s(self, role: str) -> float:
        """How long before its walltime a job of `role` is told to stop (the job's --signal lead);
        0: at the walltime itself."""
        return 0.0

    def earliest_signal(self, job: Job) -> float | None:
        """The earliest moment (epoch) the scheduler may signal `job` because of its walltime:
        walltime - the --signal lead - the scheduler's slack. None: no limit, or not running."""
        limit = job.walltime_s if job.walltime_s is not None else self.resources(job.role).walltime_s
        if job.started is None or not limit:
            return None
        return job.started + limit - self.signal_lead_s(job.role) - self.signal_slack_s

    def submit_successor(self, job: Job) -> Job:
        """Queues a job with `job`'s service id that starts once `job` has ended (a persistent
        role's successor: it needs the disk `job` holds), on the same host; returns it. Only for
        backends with `dependencies`."""
        if not self.dependencies:
            raise SchedulerError(f"{self.name}: cannot queue a job to start after another")
        self.prepare_submit(job.role)
        return self.submit_job(job.role, job.service_id, after=job.job_id)

    def start_successors(self, listed: list[Job]) -> list[str]:
        """Starts the successors (submit_successor) whose predecessor has left `listed`, for a
        scheduler that cannot start them itself; one line per job started. Slurm and PBS start
        them themselves (a dependency): nothing to do."""
        return []

    def forget(self, job: Job) -> None:
        """Drops a finished or vanished job from our records."""
        self.ledger.forget(job.job_id)

    def kill(self, job: Job) -> None:
        """Last resort after the grace period; schedulers escalate to SIGKILL themselves."""

    def reap(self, roles: Iterable[str] | None = None) -> list[str]:
        """Stops what runs on this host without the scheduler's part of its job (a wrapper whose
        supervisor is gone); returns one line per action. A batch scheduler's own job starter
        does this on its nodes: nothing to do here."""
        return []

    def recorded_ids(self) -> set[str]:
        """Ids of the jobs in our records (submitted by us and not yet forgotten)."""
        return {j.job_id for j in self.ledger.jobs()}

    def known_but_not_listed(self, role: str | None, listed: list[Job]) -> list[Job]:
        """Jobs we submitted that the queue no longer shows (finished, or removed behind our back)."""
        seen = {j.job_id for j in listed}
        return [dataclasses.replace(j, state="unknown") for j in self.ledger.jobs()
                if j.job_id not in seen and (role is None or j.role == role)]

    # --- shared helpers ------------------------------------------------------------------------
    def run(self, *argv: str, input: str | None = None, env: dict[str, str] | None = None,
            timeout: float | None = None) -> CommandResult:
        """Runs a scheduler client; failure is one line: unreachable (75) or rejected (1)."""
        return self.runner.check(list(argv), input, scheduler=self.name,
                                 unreachable_hints=self.unreachable_hints, env=env, timeout=timeout)

    def job_env(self, service_id: str | None = None) -> dict[str, str]:
        """The job's environment, set for the submit command too: the allowlisted part of ours
        (`job_environment`) and the wrapper's variables. Job scripts take the paths from it first
        (so a hand submission can override them), so it must name the spec we used."""
        values = {"SALVUS_SPEC": self.spec.source, "SALVUS_VMJOB": wrapper_path(self.spec),
                  "SALVUS_SCHEDULER": self.name}
        if service_id:
            values["SALVUS_SERVICE_ID"] = service_id
        return job_environment(os.environ, **values)

    def resources(self, role: str) -> JobResources:
        return JobResources.of(self.spec, role)

    def role(self, role: str) -> RoleSpec:
        return self.spec.role(role)

    def job_image(self, role: str) -> str:
        """The NAME@VERSION a job of `role` boots, fixed now and passed as `--image`: the wrapper
        boots that, so an edit of the spec's `image:` reaches new jobs only, never queued or
        requeued ones. A role with `image_path` passes it too (the name the trust checks use).
        A rolling upgrade sets `images[role]` to the image it rolls out."""
        return self.images.get(role) or self.role(role).image

    def job_name(self, role: str) -> str:
        """The tag that finds a job again: site and role (role names never contain a dot)."""
        return f"{self.spec.site}.{role}"

    def role_of(self, job_name: str) -> str | None:
        site, _, role = job_name.rpartition(".")
        return role if site == self.spec.site and role in self.spec.roles else None

    def template_values(self, role: str) -> dict[str, str]:
        """The spec's values for a job template, raw: each backend escapes them for its language."""
        res = self.resources(role)
        return {
            "site": self.spec.site,
            "role": role,
            "job_name": self.job_name(role),
            "spec": self.spec.source,
            "wrapper": wrapper_path(self.spec),
            "cpus": str(res.cpus),
            "memory_mb": str(res.memory_mb),
            "disk_mb": str(res.disk_mb),
            "grace": str(res.grace_s),
            "log_dir": str(self.log_dir()),
            "max_retries": str(self.spec.scheduler.max_retries),
            "image": self.job_image(role),
        }

    def render_template(self, template: str, values: dict[str, str]) -> str:
        """`template` filled with `values`, which the caller has escaped for the template's language."""
        return Template((TEMPLATES / template).read_text()).substitute(values)

    def log_dir(self) -> Path:
        return Path(self.spec.scheduler.log_dir) if self.spec.scheduler.log_dir else Store.of(self.spec).logs

    def stable_service_ids(self, role: str, n: int) -> list[str | None]:
        """Roles with persistent disks get `ROLE-K` ids, lowest free first, so a job finds its
        disk again; other roles take the scheduler's job id (`ROLE-JOBID`, set in the script)."""
        if not self.role(role).persistent:
            return [None] * n
        taken = {j.service_id for j in self.list(role) if j.state in ACTIVE_STATES + ("stopping",)}
        out: list[str | None] = []
        k = 0
        while len(out) < n:
            sid = f"{role}-{k}"
            if sid not in taken:
                out.append(sid)
            k += 1
        return out

    def image_feature(self, role: str) -> str | None:
        """The node feature a job of `role` asks for: the one `imgdist slurm-features` advertises
        on hosts that hold the role's image, version included. None when the site lets any host
        pull (`scheduler.require_image: false`) or the role boots its own `image_path`, a file
        imgdist neither pulls nor advertises."""
        from imagedist.classad import slurm_feature

        if not self.spec.scheduler.require_image or self.role(role).image_path:
            return None
        return slurm_feature(*split_image_ref(self.job_image(role)))

    def host_for(self, role: str, service_id: str | None) -> str | None:
        """Where a persistent role's job must run: the host holding its disk (`hosts[K]`)."""
        hosts = self.role(role).hosts
        if not hosts:
            return None
        if service_id and service_id.rpartition("-")[2].isdigit():
            return hosts[int(service_id.rpartition("-")[2]) % len(hosts)]
        return hosts[0] if len(hosts) == 1 else None

    def exclude_hosts(self, jobs: list[Job], hosts: list[str]) -> bool:
        """Re-places queued `jobs` (a requeued one too) so they avoid `hosts` from now on ([]: no
        host avoided); False when this scheduler cannot change a queued job's placement."""
        return False

    def excluded_hosts(self, role: str, service_id: str | None) -> list[str]:
        """Hosts a job of `role` must not be placed on: the site hosts marked unfit, but never the
        one a persistent role is pinned to (its disk is there: it waits for the fix instead)."""
        if self.role(role).network != "site":
            return []
        pinned = self.host_for(role, service_id)
        return [h for h in self.unfit_hosts if h != pinned]

    def wait_gone(self, jobs: Iterable[Job], timeout: float, poll: float = 1.0) -> list[Job]:
        """Waits until none of `jobs` is queued/running/stopping; returns those still there."""
        wanted = {j.job_id for j in jobs}
        deadline = time.monotonic() + timeout
        while True:
            left = [j for j in self.list() if j.job_id in wanted and j.state in ACTIVE_STATES + ("stopping",)]
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(poll)


def quote(s: str) -> str:
    return shlex.quote(s)


class ScriptBackend(Backend):
    """A scheduler that takes a shell script with directive comments (Slurm, PBS). Every value
    reaches the script shell-quoted; a value inside a directive line must be a word that needs no
    quoting (schedulers' directive parsers do not all understand shell quotes), else it is refused."""

    template = ""
    directive = ""  # "#SBATCH", "#PBS"
    # How this scheduler spells the spec's placement options ({} is the value); absent: not offered.
    directive_forms: dict[str, str] = {}
    # The job id as the job script sees it (the default service id is ROLE-<that>).
    job_id_expr = ""

    def format_walltime(self, seconds: int) -> str:
        """The walltime as this scheduler's directive takes it."""
        raise NotImplementedError

    def directives(self, role: str, service_id: str | None) -> list[str]:
        s = self.spec.scheduler
        walltime_s = self.resources(role).walltime_s
        values = {"queue": s.queue, "account": s.account,
                  "walltime": self.format_walltime(walltime_s) if walltime_s else None,
                  "host": self.host_for(role, service_id), "feature": self.image_feature(role),
                  "exclude": ",".join(self.excluded_hosts(role, service_id))}
        return [self.directive_forms[k].format(self.directive_word(k, v))
                for k, v in values.items() if v and k in self.directive_forms]

    def directive_word(self, field: str, value: str) -> str:
        if quote(value) != value:
            raise SpecError(f"{self.spec.source}: scheduler: {field} {value!r} cannot go into a {self.directive} "
                            "line: use letters, digits and @%+=:,./_- only (no spaces or quotes)")
        return value

    def extra_directive_lines(self) -> str:
        """The site's `scheduler.extra_directives`, verbatim: each one line (the spec refuses
        newlines), either `PREFIX ...` or a bare `-option` that gets the prefix; anything else would
        be a shell command in the job script and is refused."""
        out = ""
        for i, d in enumerate(self.spec.scheduler.extra_directives):
            if d.startswith(self.directive + " "):
                out += d + "\n"
            elif d.startswith("-"):
                out += f"{self.directive} {d}\n"
            else:
                raise SpecError(f"{self.spec.source}: scheduler.extra_directives[{i}]: expected a "
                                f"'{self.directive} ...' line or a '-option', got {d[:60]!r}")
        return out

    def explain_refusal(self, role: str, e: SchedulerError) -> SchedulerError:
        """Slurm (also behind its qsub) refuses a job whose feature no node of the partition has:
        say which image no host advertises yet."""
        feature = self.image_feature(role)
        if feature and "Invalid feature specification" in str(e):
            return SchedulerError(f"{e}: no node advertises {feature} ({self.job_image(role)}): pull it on "
                                  "a host first (imgdist sync, then imgdist slurm-features), or set "
                                  "scheduler.require_image: false")
        return e

    def render(self, role: str, service_id: str | None = None) -> str:
        checked_service_id(service_id)
        directives = "".join(f"{self.directive} {d}\n" for d in self.directives(role, service_id))
        directives += self.extra_directive_lines()
        values = {k: quote(v) for k, v in self.template_values(role).items()}
        self.directive_word("log_dir", str(self.log_dir()))  # it is in the template's directives
        # Persistent roles need a stable id even when submitted by hand: the first one's. The job
        # id expression is the template's own text and stays an expansion.
        if service_id or self.role(role).persistent:
            default = quote(service_id or f"{role}-0")
        else:
            default = quote(f"{role}-") + self.job_id_expr
        return self.render_template(self.template, {**values, "directives": directives,
                                                    "default_service_id": default})
