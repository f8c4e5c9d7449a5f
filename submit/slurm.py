"""Slurm: sbatch scripts; `sbatch` / `squeue` / `scancel` / `scontrol`.

Jobs are tagged by name (`SITE.ROLE`) so one `squeue --name` finds every role's jobs; a stable
service id (persistent roles) travels as $SALVUS_SERVICE_ID and in the job's comment, and so does
the submission's token (`salvus:SERVICE_ID:TOKEN`), by which a job whose id we never read is
adopted (Backend.adopt).
"""
from __future__ import annotations

import time

from cluster.errors import SchedulerError
from submit.base import Job, ScriptBackend, clock_time
from submit.runner import last_line

SQUEUE_FORMAT = "%i|%j|%T|%r|%V|%k"
SQUEUE_FIELDS = "JOBID|NAME|STATE|REASON|SUBMIT_TIME|COMMENT"

# Slurm job states -> ours. COMPLETING is a cancelled or finished job whose processes are still
# being signalled: the wrapper is shutting its guest down.
STATE_MAP = {
    "PENDING": "queued", "REQUEUED": "queued", "REQUEUE_FED": "queued", "CONFIGURING": "running",
    "RUNNING": "running", "RESIZING": "running", "SIGNALING": "running", "STAGE_OUT": "stopping",
    "COMPLETING": "stopping", "COMPLETED": "done", "CANCELLED": "done",
    "SUSPENDED": "held", "STOPPED": "held", "SPECIAL_EXIT": "held", "REQUEUE_HOLD": "held",
    "RESV_DEL_HOLD": "held",
    "FAILED": "failed", "TIMEOUT": "failed", "NODE_FAIL": "failed", "OUT_OF_MEMORY": "failed",
    "BOOT_FAIL": "failed", "DEADLINE": "failed", "PREEMPTED": "failed", "REVOKED": "failed",
}
HELD_REASONS = ("JobHeldUser", "JobHeldAdmin")


class SlurmBackend(ScriptBackend):
    name = "slurm"
    template = "slurm.sbatch.tmpl"
    directive = "#SBATCH"
    unreachable_hints = ("Unable to contact slurm controller", "Socket timed out", "Connection refused",
                         "Zero Bytes were transmitted")

    directive_forms = {"queue": "--partition={}", "account": "--account={}", "walltime": "--time={}",
                       "host": "--nodelist={}", "feature": "--constraint={}",
                       "exclude": "--exclude={}"}
    job_id_expr = "${SLURM_JOB_ID}"
    tokens = True
    signal_slack_s = 60.0  # "the signal may be sent up to 60 seconds earlier than specified" (sbatch(1))

    def format_walltime(self, seconds: int) -> str:
        days, rest = divmod(seconds, 86400)
        return f"{days}-{clock_time(rest)}" if days else clock_time(rest)

    def directives(self, role: str, service_id: str | None) -> list[str]:
        lines = super().directives(role, service_id)
        if self.signal_lead_s(role):
            # SIGTERM to the batch shell (the wrapper, by exec) before the limit; Slurm may send
            # it up to 60 s early.
            lines.append(f"--signal=B:TERM@{int(self.signal_lead_s(role))}")
        return lines

    def signal_lead_s(self, role: str) -> float:
        res = self.resources(role)
        return float(res.grace_s + 60) if res.walltime_s else 0.0

    # --- submit / list / cancel ----------------------------------------------------------------
    def submit_one(self, role: str, service_id: str | None, token: str = "") -> str:
        # Names only: sbatch passes their values from its own environment (no value on the command
        # line, none split at a comma), and nothing else of ours; Slurm adds its SLURM_* itself.
        env = self.job_env(service_id)
        try:
            r = self.run("sbatch", "--parsable", f"--export={','.join(sorted(env))}",
                         f"--comment=salvus:{service_id or ''}:{token}", input=self.render(role, service_id), env=env)
        except SchedulerError as e:
            raise self.explain_refusal(role, e) from None
        job_id = r.stdout.strip().split(";")[0]  # --parsable: ID or ID;CLUSTER
        if not job_id.isdigit():
            raise SchedulerError(f"sbatch: expected a job id, got {last_line(r.stdout)!r}")
        return job_id

    def list(self, role: str | None = None) -> list[Job]:
        names = ",".join(self.job_name(r) for r in ([role] if role else self.spec.roles))
        r = self.run("squeue", "--noheader", "--array", "--states=all", f"--name={names}",
                     f"--format={SQUEUE_FORMAT}")
        jobs = parse_squeue(r.stdout, self)
        held = [j for j in jobs if j.state == "held"]
        if held:
            self.explain_holds(held)
        return jobs

    def explain_holds(self, held: list[Job]) -> None:
        """Adds the exit code that caused a hold (RequeueExitHold) to the hold reason."""
        r = self.runner.run(["scontrol", "--oneliner", "show", "job"])
        if r.returncode != 0:
            return  # the hold reason alone is still worth showing
        exit_codes = {}
        for line in r.stdout.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            exit_codes[fields.get("JobId", "")] = fields.get("ExitCode", "")
        for job in held:
            code = exit_codes.get(job.job_id, "").split(":")[0]
            if code and code != "0":
                job.hold_reason = f"salvus-vmjob exited {code} ({job.hold_reason}); fix, then scontrol release {job.job_id}"

    def cancel(self, job: Job) -> None:
        # scancel: SIGTERM to the batch script's process (the wrapper), SIGKILL after KillWait.
        self.run("scancel", job.job_id)


def parse_submit_time(text: str) -> float:
    """squeue's %V (local time, ISO without zone) -> epoch seconds."""
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return 0.0


def parse_squeue(out: str, backend: SlurmBackend) -> list[Job]:
    jobs = []
    for n, line in enumerate(out.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) != 6 or not parts[0].replace("_", "").replace("[", "").replace("]", "").replace("-", "").isdigit():
            raise SchedulerError(f"squeue: unexpected output on line {n}: {line[:120]!r} "
                                 f"(expected {SQUEUE_FIELDS})")
        job_id, name, state, reason, submitted, comment = parts
        role = backend.role_of(name)
        if role is None:
            continue
        base_state = state.split()[0].rstrip("+")
        ours = STATE_MAP.get(base_state, "unknown")
        hold_reason = ""
        if ours == "queued" and reason in HELD_REASONS:
            ours = "held"
        if ours == "held":
            hold_reason = reason if reason not in ("None", "") else base_state
        sid, _, token = comment[len("salvus:"):].partition(":") if comment.startswith("salvus:") else ("", "", "")
        jobs.append(Job(job_id, role, ours, sid or f"{role}-{job_id}", parse_submit_time(submitted),
                        hold_reason, backend.name, token))
    return jobs
