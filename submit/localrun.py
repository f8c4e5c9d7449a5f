"""The local executor's per-job supervisor:
`python -m submit.localrun JOBDIR JOB_ID MAX_RETRIES [--walltime S] [--grace S] [--after ID] -- CMD...`.

It plays the part a batch scheduler's job starter plays: runs the wrapper (in a process group of
its own), forwards SIGTERM/SIGINT to it, applies the job contract's retry policy (75 -> run again,
65/78 -> held with a reason, 0 -> done), enforces the walltime (SIGTERM when the job has run that
long since it first started, across retries, SIGKILL to the wrapper's process group after the
grace) and, with --after, starts only once that job's supervisor and wrapper are gone (a
persistent role's successor). It writes `JOB_ID.state` (only it, and the reaper once it is gone:
`LocalBackend.reap`) so `list` knows what happened after the CLI that started it is long gone.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster.files import STATE_MODE, process_start_time, write_atomic_text
from submit.base import CLEANUP_GRACE_S, EXIT_HOLD, EXIT_RETRY

POLL_S = 1.0  # how often a successor looks at its predecessor, and a retry's back-off at the clock


def last_log_line(path: Path, limit: int = 8192) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _same_process(pid: object, started: object) -> bool:
    return isinstance(pid, int) and pid > 1 and started is not None and process_start_time(pid) == started


def job_gone(job_dir: Path, job_id: str) -> bool:
    """True once neither `job_id`'s supervisor nor its wrapper runs (or it has no record at all):
    the moment a batch scheduler's afterany dependency is satisfied."""
    rec, st = _read_json(job_dir / f"{job_id}.json"), _read_json(job_dir / f"{job_id}.state")
    if not rec:
        return True
    if rec.get("pid") is None and isinstance(rec.get("submitted"), (int, float)) \
            and time.time() - rec["submitted"] < 30:
        return False  # being started right now
    return not (_same_process(rec.get("pid"), rec.get("pid_start"))
                or _same_process(st.get("wrapper_pid"), st.get("wrapper_start")))


def supervise(job_dir: Path, job_id: str, max_retries: int, cmd: list[str], walltime_s: float | None = None,
              grace_s: float = CLEANUP_GRACE_S, after: str | None = None) -> int:
    state_file = job_dir / f"{job_id}.state"
    err_log = Path(os.environ.get("SALVUS_LOCAL_ERR_LOG", "/dev/null"))
    # `by`: why the job is being stopped ("cancel" or "walltime"); None while it runs on.
    stop: dict[str, str | None] = {"by": None}
    child: dict[str, subprocess.Popen | None] = {"p": None}
    started: float | None = None  # when the job first ran: its walltime is measured from here

    def write(**fields: object) -> None:
        write_atomic_text(state_file, json.dumps({"job_id": job_id, "supervisor": os.getpid(),
                                                  "updated": time.time(), "started": started,
                                                  "walltime_s": walltime_s, **fields}), STATE_MODE)

    def terminate() -> None:
        p = child["p"]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)  # the wrapper turns this into a clean guest shutdown

    def on_signal(signum: int, _frame: object) -> None:
        stop["by"] = stop["by"] or "cancel"
        terminate()

    def left() -> float:
        return float("inf") if walltime_s is None or started is None else started + walltime_s - time.time()

    def limit_reason() -> str:
        return f"walltime {walltime_s:g}s reached"

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if after:
        write(state="queued", reason=f"waiting for job {after} to end", after=after)
        while not job_gone(job_dir, after):
            if stop["by"]:
                write(state="done", ended_by="cancel", reason=f"cancelled while waiting for job {after}")
                return 0
            time.sleep(POLL_S)
    attempt = 0
    while True:
        attempt += 1
        if stop["by"]:  # a cancel during the back-off: nothing more to run
            write(state="done", ended_by="cancel", attempt=attempt - 1, reason="cancelled")
            return 0
        # Its own process group: the SIGKILL after the grace reaches whatever the wrapper started.
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, process_group=0)
        child["p"] = p
        if started is None:
            started = time.time()
        # The wrapper's start time with its pid: the reaper finds an orphaned wrapper by both.
        write(state="running", wrapper_pid=p.pid, wrapper_start=process_start_time(p.pid), attempt=attempt)
        if stop["by"]:
            p.send_signal(signal.SIGTERM)
        rc, killed = _wait(p, left, grace_s, stop, terminate)
        if stop["by"] == "walltime" or killed:
            reason = (f"{limit_reason()}: SIGTERM" if stop["by"] == "walltime" else "cancelled") \
                + (f", SIGKILL after the {grace_s:g}s grace" if killed else "")
            write(state="done", ended_by=stop["by"], exit_code=rc, attempt=attempt,
                  reason=f"{reason}; the wrapper exited {rc}")
            return 0
        if stop["by"] or rc == 0:
            write(state="done", ended_by=stop["by"] or "exit", exit_code=rc, attempt=attempt,
                  reason="cancelled" if stop["by"] else "")
            return 0
        if rc == EXIT_RETRY and attempt <= max_retries:
            write(state="queued", exit_code=rc, attempt=attempt,
                  reason=f"retrying after exit 75: {last_log_line(err_log)}")
            back_off = time.monotonic() + min(30, 2 ** attempt)
            while time.monotonic() < back_off and not stop["by"] and left() > 0:
                time.sleep(min(POLL_S, back_off - time.monotonic()))
            if left() <= 0:
                write(state="done", ended_by="walltime", exit_code=rc, attempt=attempt,
                      reason=f"{limit_reason()} while waiting to retry after exit 75")
                return 0
            continue
        reason = f"salvus-vmjob exited {rc}: {last_log_line(err_log) or 'see ' + str(err_log)}"
        write(state="held" if rc in EXIT_HOLD or rc == EXIT_RETRY else "failed", ended_by="exit",
              exit_code=rc, attempt=attempt, reason=reason)
        return rc


def _wait(p: subprocess.Popen, left, grace_s: float, stop: dict, terminate) -> tuple[int, bool]:
    """Waits for the wrapper; at the walltime SIGTERMs it, and SIGKILLs its process group if it is
    still there after the grace, as a batch scheduler's limit does. Returns (exit code, killed)."""
    while True:
        try:
            return p.wait(timeout=max(0.0, min(left(), 3600.0))), False
        except subprocess.TimeoutExpired:
            if left() <= 0:
                break
    stop["by"] = stop["by"] or "walltime"  # a cancel already under way stays a cancel
    terminate()
    try:
        return p.wait(timeout=grace_s), False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return p.wait(), True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sep = argv.index("--")
    ap = argparse.ArgumentParser(prog="submit.localrun")
    ap.add_argument("job_dir", type=Path)
    ap.add_argument("job_id")
    ap.add_argument("max_retries", type=int)
    ap.add_argument("--walltime", type=float, default=None)
    ap.add_argument("--grace", type=float, default=CLEANUP_GRACE_S)
    ap.add_argument("--after", default=None)
    a = ap.parse_args(argv[:sep])
    return supervise(a.job_dir, a.job_id, a.max_retries, argv[sep + 1:], a.walltime, a.grace, a.after)


if __name__ == "__main__":
    sys.exit(main())
