"""Slurm: sbatch scripts; `sbatch` / `squeue` / `scancel` / `scontrol`.

Jobs are tagged by name (`SITE.ROLE`) so one `squeue --name --user` finds every role's jobs (the
user: `Backend.submit_user`; another user's jobs of the same name are not ours); a stable
service id (persistent roles) travels as $SALVUS_SERVICE_ID and in the job's comment, and so do
the submission's token and the image the job boots (`salvus:SERVICE_ID:TOKEN:IMAGE`; jobs queued
before the image was added carry `salvus:SERVICE_ID:TOKEN`); by the token a job whose id we never
read is adopted (Backend.adopt). A successor (submit_successor) waits with `--dependency=afterany`.
"""
from __future__ import annotations

import time

from cluster.errors import SchedulerError, SpecError
from cluster.spec import parse_walltime
from cluster.yamlmodel import is_image_ref, is_service_id
from submit.base import Job, ScriptBackend, clock_time
from submit.runner import last_line

# The comment last: it is anyone's writing and may hold a '|' (the line is split 7 times only).
SQUEUE_FORMAT = "%i|%j|%T|%r|%V|%S|%l|%k"
SQUEUE_FIELDS = "JOBID|NAME|STATE|REASON|SUBMIT_TIME|START_TIME|TIME_LIMIT|COMMENT"

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
# How a finished job ended, by its final state (anything else: not known).
ENDED_BY = {"TIMEOUT": "walltime", "CANCELLED": "cancel", "COMPLETED": "exit", "FAILED": "exit"}


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
    dependencies = True  # --dependency=afterany:ID
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
    def submit_one(self, role: str, service_id: str | None, token: str = "", after: str = "") -> str:
        # Names only: sbatch passes their values from its own environment (no value on the command
        # line, none split at a comma), and nothing else of ours; Slurm adds its SLURM_* itself.
        env = self.job_env(service_id)
        argv = ["sbatch", "--parsable", f"--export={','.join(sorted(env))}",
                f"--comment=salvus:{service_id or ''}:{token}:{self.job_image(role)}"]
        if after:
            if not after.isdigit():
                raise SchedulerError(f"sbatch: a successor waits for a Slurm job id, got {after[:40]!r}")
            # Once the predecessor ended however it ended; the script's --nodelist keeps the host.
            argv.append(f"--dependency=afterany:{after}")
        try:
            r = self.run(*argv, input=self.render(role, service_id), env=env)
        except SchedulerError as e:
            raise self.explain_refusal(role, e) from None
        job_id = r.stdout.strip().split(";")[0]  # --parsable: ID or ID;CLUSTER
        if not job_id.isdigit():
            raise SchedulerError(f"sbatch: expected a job id, got {last_line(r.stdout)!r}")
        return job_id

    def list(self, role: str | None = None) -> list[Job]:
        names = ",".join(self.job_name(r) for r in ([role] if role else self.spec.roles))
        r = self.run("squeue", "--noheader", "--array", "--states=all", f"--name={names}",
                     f"--user={self.submit_user}", f"--format={SQUEUE_FORMAT}")
        if "Invalid user" in r.stderr:
            # squeue says so on stderr and exits 0 with an empty listing: that must not read as
            # "none of ours queued" (every scale would submit again).
            raise SpecError(f"{self.spec.source}: scheduler.submit_user: Slurm knows no user "
                            f"{self.submit_user!r} ({last_line(r.stderr)})")
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

    def exclude_hosts(self, jobs: list[Job], hosts: list[str]) -> bool:
        # One update for every job: scontrol takes a list of job ids. Pending jobs only (Slurm
        # refuses the others, which are past placement anyway).
        for h in hosts:
            self.directive_word("exclude", h)
        self.run("scontrol", "update", f"JobId={','.join(j.job_id for j in jobs)}", f"ExcNodeList={','.join(hosts)}")
        return True

    def cancel(self, job: Job) -> None:
        # scancel: SIGTERM to the batch script's process (the wrapper), SIGKILL after KillWait.
        self.run("scancel", job.job_id)


def parse_submit_time(text: str) -> float:
    """squeue's %V (local time, ISO without zone) -> epoch seconds."""
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return 0.0


def parse_time_limit(text: str) -> float | None:
    """squeue's %l (MM:SS, H:MM:SS, D-HH:MM:SS; UNLIMITED, N/A, INVALID, NOT_SET) -> seconds, None
    for no limit or anything unreadable (the limit is then the spec's, Backend.earliest_signal)."""
    try:
        return float(parse_walltime(text.strip()))
    except ValueError:
        return None


def parse_comment(comment: str) -> tuple[str, str, str]:
    """Our job comment `salvus:SID:TOKEN[:IMAGE]` -> (service id, token, image); a comment is
    anyone's writing (scontrol update), so a field that is not well-formed is left empty."""
    if not comment.startswith("salvus:"):
        return "", "", ""
    sid, _, rest = comment[len("salvus:"):].partition(":")
    token, _, image = rest.partition(":")
    return (sid if is_service_id(sid) else "", token if token.isalnum() else "",
            image if is_image_ref(image) else "")


def parse_squeue(out: str, backend: SlurmBackend) -> list[Job]:
    jobs = []
    for n, line in enumerate(out.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("|", 7)
        if len(parts) != 8 or not parts[0].replace("_", "").replace("[", "").replace("]", "").replace("-", "").isdigit():
            raise SchedulerError(f"squeue: unexpected output on line {n}: {line[:120]!r} "
                                 f"(expected {SQUEUE_FIELDS})")
        job_id, name, state, reason, submitted, start, limit, comment = parts
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
        sid, token, image = parse_comment(comment)
        # A pending job's %S is Slurm's guess at its start: only a running one has started.
        started = (parse_submit_time(start) or None) if ours in ("running", "stopping") else None
        jobs.append(Job(job_id, role, ours, sid or f"{role}-{job_id}", parse_submit_time(submitted),
                        hold_reason, backend.name, token, started=started, walltime_s=parse_time_limit(limit),
                        image=image, ended_by=ENDED_BY.get(base_state, "") if ours in ("done", "failed") else ""))
    return jobs
