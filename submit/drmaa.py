"""Any DRMAA 1.0 scheduler through the `drmaa` package (tested with Son of Grid Engine; the native
specification and the re-placement of queued jobs, `qalter`, are Grid Engine's).

DRMAA can submit, ask one job's status and control it, but cannot list a queue: `list` asks about
the jobs in our ledger, and that is the ownership rule here (Backend.submit_user): only jobs this
site submitted are ever counted or cancelled, never another user's with the same name. Each job
runs `jobscripts/drmaa-vmjob.sh salvus-vmjob ...`, which maps the wrapper's exit codes to Grid
Engine's (75 -> 99 requeue, 65/78 -> 100 error/hold). TERMINATE is graceful when the queue's
`terminate_method` sends SIGTERM first (SGE's default is SIGKILL).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

from cluster.errors import SchedulerError, SchedulerUnavailable
from submit.base import Backend, Job, checked_service_id, quote, wrapper_path
from submit.runner import last_line

JOB_SCRIPT = Path(__file__).resolve().parent / "jobscripts" / "drmaa-vmjob.sh"
DEFAULT_LIBRARY = "/usr/lib/gridengine-drmaa/lib/libdrmaa.so.1.0"
JEMALLOC = "/lib/x86_64-linux-gnu/libjemalloc.so.2"
SGE_CLIENT_ENV = ("SGE_ROOT", "SGE_CELL", "SGE_QMASTER_PORT", "SGE_EXECD_PORT")

# drmaa.JobState values -> ours.
STATE_MAP = {
    "queued_active": "queued", "system_on_hold": "held", "user_on_hold": "held",
    "user_system_on_hold": "held", "running": "running", "system_suspended": "held",
    "user_suspended": "held", "user_system_suspended": "held", "done": "done", "failed": "failed",
    "undetermined": "unknown",
}


class DrmaaBackend(Backend):
    name = "drmaa"
    dependencies = True  # Grid Engine's -hold_jid ID in the native specification

    def session_env(self) -> dict[str, str]:
        lib = os.environ.get("DRMAA_LIBRARY_PATH") or self.spec.scheduler.drmaa_library or DEFAULT_LIBRARY
        env = {"DRMAA_LIBRARY_PATH": lib}
        if Path(JEMALLOC).exists() and "gridengine" in lib:
            env["LD_PRELOAD"] = JEMALLOC  # Grid Engine's libdrmaa needs it (static TLS)
        return env

    def call(self, request: dict) -> dict:
        """One request to the DRMAA helper process (submit.drmaa_session), through the runner."""
        from cluster.extras import require_installed

        require_installed("drmaa", "drmaa", "scheduler.backend: drmaa")
        r = self.runner.run([sys.executable, "-m", "submit.drmaa_session"], json.dumps(request),
                            env=self.session_env(), timeout=120)
        try:
            answer = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise SchedulerError(f"drmaa: no answer from the DRMAA helper: "
                                 f"{last_line(r.stderr or r.stdout)}") from None
        if "error" in answer:
            cls = SchedulerUnavailable if answer.get("kind") == "unavailable" else SchedulerError
            raise cls(f"drmaa ({request['op']}): {answer['error']}")
        return answer

    def native_spec(self, role: str, service_id: str | None, after: str = "") -> str:
        s = self.spec.scheduler
        res = self.resources(role)
        # Memory is not requested: Grid Engine sites define their own memory complexes (h_vmem
        # would also kill QEMU, whose virtual size far exceeds the guest's RAM); use native_spec.
        parts = ["-r y"]
        if res.cpus > 1:
            parts.append(f"-pe smp {res.cpus}")
        if s.queue:
            parts.append(f"-q {s.queue}")
        if s.account:
            parts.append(f"-A {s.account}")
        hard = self.hard_resources(role, service_id)
        parts += [f"-l {r}" for r in hard]
        if any(r.startswith("h=!") for r in hard):
            # Grid Engine's DRMAA verifies a job at submission (-w e) and refuses one no host fits
            # now; with every host marked unfit the job must wait for a fix instead (-w w: warn).
            parts.append("-w w")
        if after:
            if not after.isdigit():
                raise SchedulerError(f"drmaa: a successor waits for a Grid Engine job id, got {after[:40]!r}")
            parts.append(f"-hold_jid {after}")  # starts once that job has ended, however it ended
        if s.native_spec:
            parts.append(s.native_spec)
        return " ".join(parts)

    def hard_resources(self, role: str, service_id: str | None, avoid: list[str] | None = None) -> list[str]:
        """Our `-l` requests: the walltime, and the host a persistent role is pinned to or else a
        Grid Engine host expression that avoids the hosts marked unfit (`h=!(a|b)`; host names
        hold none of `!|()&*?[]`, the spec's HypervisorName says so). `avoid`: those hosts
        instead of the marked ones."""
        res = self.resources(role)
        out = [f"h_rt={res.walltime_s}"] if res.walltime_s else []
        host = self.host_for(role, service_id)
        avoid = self.excluded_hosts(role, service_id) if avoid is None else avoid
        if host:
            out.append(f"h={host}")
        elif avoid:
            out.append(f"h=!({'|'.join(avoid)})")
        return out

    def exclude_hosts(self, jobs: list[Job], hosts: list[str]) -> bool:
        """Grid Engine's `qalter -l` (DRMAA cannot change a submitted job). It replaces the job's
        whole hard resource list, so it is given all of it: ours with the new placement, then
        the `-l` requests of the site's scheduler.native_spec, as at submission."""
        site = shlex.split(self.spec.scheduler.native_spec or "")
        site_l = [v for flag, v in zip(site, site[1:]) if flag == "-l"]
        by_list: dict[str, list[str]] = {}
        for j in jobs:
            wanted = self.hard_resources(j.role, j.service_id, avoid=hosts) + site_l
            # An empty list cannot be given; any host (`h=*`) is what no request means.
            by_list.setdefault(",".join(wanted or ["h=*"]), []).append(j.job_id)
        for wanted, ids in by_list.items():
            self.run("qalter", "-l", wanted, *ids)
        return True

    def job_template(self, role: str, service_id: str | None, after: str = "") -> dict:
        """The fields of a drmaa.JobTemplate, as the helper process sets them."""
        checked_service_id(service_id)
        args = [wrapper_path(self.spec), "--spec", self.spec.source, "--role", role, "--image", self.job_image(role)]
        if service_id:
            args += ["--service-id", service_id]  # else the wrapper's default: ROLE-$JOB_ID
        logs = self.log_dir()
        return {"command": str(JOB_SCRIPT), "args": args, "name": self.job_name(role),
                "native": self.native_spec(role, service_id, after),
                "stdout": str(logs / f"{self.job_name(role)}.$JOB_ID.out"),
                "stderr": str(logs / f"{self.job_name(role)}.$JOB_ID.err"),
                # The allowlisted environment, and the cell's client settings so the job script's
                # qhold reaches this cell.
                "env": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **self.job_env(service_id),
                        **{k: os.environ[k] for k in SGE_CLIENT_ENV if k in os.environ}}}

    def render(self, role: str, service_id: str | None = None) -> str:
        """The DRMAA job template, spelled as the equivalent Grid Engine qsub command."""
        t = self.job_template(role, service_id)
        # The native specification is the site's own qsub options, several words: not one quoted word.
        return (f"# DRMAA job template for one {role} VM (submitted with drmaa.Session.runJob)\n"
                f"qsub -N {quote(t['name'])} {t['native']} -o {quote(t['stdout'])} -e {quote(t['stderr'])} "
                f"-b y {quote(t['command'])} {' '.join(quote(a) for a in t['args'])}\n")

    def submit_one(self, role: str, service_id: str | None, after: str = "") -> str:
        # One request per job (the helper could take several), so each is recorded before the next.
        return self.call({"op": "submit", "templates": [self.job_template(role, service_id, after)]})["ids"][0]

    def list(self, role: str | None = None) -> list[Job]:
        # The ledger's jobs only (ours by construction): DRMAA has no query for anyone else's.
        known = [j for j in self.ledger.jobs() if role is None or j.role == role]
        if not known:
            return []
        states = self.call({"op": "status", "ids": [j.job_id for j in known]})["states"]
        cancelled = self.cancelled_ids()
        jobs = []
        for j in known:
            state = states.get(j.job_id, "gone")
            if state == "gone":
                continue  # finished and forgotten by the scheduler: reported as gone by `scale`
            j.state = STATE_MAP.get(state, "unknown")
            if state == "system_on_hold" and j.after:
                # -hold_jid: Grid Engine holds a successor until its predecessor has ended (and
                # for a moment after: it releases it on its next scheduling run).
                j.state, j.hold_reason = "queued", f"waiting for job {j.after} to end"
            if j.job_id in cancelled and j.state in ("running", "queued"):
                j.state = "stopping"
            if j.state == "held":
                j.hold_reason = (f"DRMAA state {state}: held after salvus-vmjob exit 65/78 (see the job's "
                                 f".err log), or by an operator; qrls {j.job_id} once fixed")
            jobs.append(j)
        return jobs

    def cancelled_ids(self) -> set[str]:
        d = self.ledger.dir / "cancelled"
        return {p.name for p in d.iterdir()} if d.is_dir() else set()

    def cancel(self, job: Job) -> None:
        d = self.ledger.dir / "cancelled"
        d.mkdir(parents=True, exist_ok=True)
        (d / job.job_id).touch()  # DRMAA still says "running" while the guest shuts down
        self.call({"op": "terminate", "ids": [job.job_id]})

    def forget(self, job: Job) -> None:
        super().forget(job)
        (self.ledger.dir / "cancelled" / job.job_id).unlink(missing_ok=True)
