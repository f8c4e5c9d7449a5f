"""PBS/Torque: `#PBS` scripts; `qsub` / `qstat -f` / `qdel` (Torque, PBS Pro, or Slurm's
PBS-compatible wrappers, which is how the tests run it).

`qsub` through some wrappers ignores in-script `-o`/`-e`, so logs are named on the command line; the
script is written to a file because those wrappers do not read one from stdin.

Ours are the jobs of `Backend.submit_user` by their `Job_Owner` (USER@SUBMITHOST), read from
`qstat -f`: `qstat -u` belongs to the one-line display formats (Torque, PBS Pro, and Slurm's wrapper,
which with `-f -u` prints the one-line table), so the owner is filtered here.
"""
from __future__ import annotations

import re
import time

from cluster.errors import SchedulerError
from cluster.store import Store
from submit.base import Job, ScriptBackend, clock_time
from submit.runner import last_line

# Torque job_state letters -> ours (E: exiting, the wrapper is shutting its guest down).
STATE_MAP = {"Q": "queued", "W": "queued", "T": "queued", "R": "running", "E": "stopping",
             "H": "held", "S": "held", "C": "done", "F": "done"}
JOB_ID_RE = re.compile(r"\d+(\.[\w.-]+)?")


class PbsBackend(ScriptBackend):
    name = "pbs"
    template = "pbs.tmpl"
    directive = "#PBS"
    unreachable_hints = ("Unable to contact slurm controller", "cannot connect to server",
                         "Connection refused", "pbs_connect")

    directive_forms = {"queue": "-q {}", "account": "-A {}", "walltime": "-l walltime={}",
                       "host": "-l host={}", "feature": "-l proc={}"}
    job_id_expr = "${job_id%%.*}"  # Torque ids are NUMBER.SERVER
    dependencies = True  # -W depend=afterany:ID

    def format_walltime(self, seconds: int) -> str:
        return clock_time(seconds)  # Torque takes HH:MM:SS (hours past 24), not Slurm's D-HH:MM:SS

    def submit_one(self, role: str, service_id: str | None, after: str = "") -> str:
        logs = self.log_dir()
        scripts = Store.of(self.spec).runtime.scripts_dir
        script = scripts / f"{self.job_name(role)}.{service_id or 'job'}.pbs"
        self.runner.write_file(script, self.render(role, service_id), mode=0o755)
        stamp = f"{self.job_name(role)}.{int(time.time() * 1000)}"
        argv = ["qsub", "-o", str(logs / f"{stamp}.out"), "-e", str(logs / f"{stamp}.err")]
        # -v with names only and no -V: the job gets these from qsub's environment, nothing else
        # of ours (PBS adds its PBS_O_* itself).
        env = self.job_env(service_id)
        argv += ["-v", ",".join(sorted(env))]
        if after:
            if not JOB_ID_RE.fullmatch(after):
                raise SchedulerError(f"qsub: a successor waits for a PBS job id, got {after[:40]!r}")
            argv += ["-W", f"depend=afterany:{after}"]  # the script's -l host keeps the host
        try:
            job_id = self.run(*argv, str(script), env=env).stdout.strip()
        except SchedulerError as e:
            raise self.explain_refusal(role, e) from None
        if not JOB_ID_RE.fullmatch(job_id):
            raise SchedulerError(f"qsub: expected a job id, got {last_line(job_id)!r}")
        return job_id

    def default_service_id(self, role: str, job_id: str) -> str:
        return f"{role}-{job_id.split('.')[0]}"  # as the script's ${job_id%%.*}

    def list(self, role: str | None = None) -> list[Job]:
        out = self.run("qstat", "-f").stdout
        known = {j.job_id: j.service_id for j in self.ledger.jobs()}
        jobs = [j for j in parse_qstat_full(out, self, known) if role is None or j.role == role]
        return jobs

    def cancel(self, job: Job) -> None:
        self.run("qdel", job.job_id)


def job_owner(attrs: dict[str, str]) -> str:
    """The user of `Job_Owner = USER@SUBMITHOST`; "" when not shown (then it is nobody's we know)."""
    return attrs.get("Job_Owner", "").strip().partition("@")[0]


def parse_qstat_full(out: str, backend: PbsBackend, known_sids: dict[str, str | None]) -> list[Job]:
    """`qstat -f` (blocks of `Job Id: ID` then indented `key = value` lines) -> our jobs."""
    jobs = []
    blocks = re.split(r"^Job Id:\s*", out, flags=re.M)
    if blocks[0].strip():
        raise SchedulerError(f"qstat -f: unexpected output before the first 'Job Id:': "
                             f"{blocks[0].strip()[:120]!r}")
    for block in blocks[1:]:
        lines = block.splitlines()
        job_id = lines[0].strip()
        attrs = dict(m.groups() for m in (re.match(r"^\s+([\w.]+) = (.*)$", ln) for ln in lines[1:]) if m)
        if not job_id or "job_state" not in attrs:
            raise SchedulerError(f"qstat -f: job {job_id!r} has no job_state")
        role = backend.role_of(attrs.get("Job_Name", ""))
        if role is None or job_owner(attrs) != backend.submit_user:
            continue  # not this site's, or another user's look-alike
        state = STATE_MAP.get(attrs["job_state"].strip(), "unknown")
        waiting = ""
        if state == "held" and attrs.get("depend") and set(attrs.get("Hold_Types", "s").strip()) <= {"s", "n"}:
            # Torque holds a job (system hold) until its dependency is met: a successor, queued.
            state, waiting = "queued", f"waiting for {attrs['depend'].strip()[:120]}"
        try:
            submitted = time.mktime(time.strptime(attrs.get("qtime", ""), "%a %b %d %H:%M:%S %Y"))
        except ValueError:
            submitted = 0.0
        reason = attrs.get("comment", "") or (f"job_state {attrs['job_state']}" if state == "held" else "")
        sid = known_sids.get(job_id) or f"{role}-{job_id.split('.')[0]}"
        jobs.append(Job(job_id, role, state, sid, submitted, reason if state == "held" else waiting, backend.name))
    return jobs
