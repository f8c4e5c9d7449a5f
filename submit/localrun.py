"""The local executor's per-job supervisor: `python -m submit.localrun JOBDIR JOB_ID MAX_RETRIES -- CMD...`.

It plays the part a batch scheduler's job starter plays: runs the wrapper, forwards SIGTERM/SIGINT to
it, and applies the job contract's retry policy (75 -> run again, 65/78 -> held with a reason,
0 -> done). It writes `JOB_ID.state` (only it, and the reaper once it is gone: `LocalBackend.reap`)
so `list` knows what happened after the CLI that started it is long gone.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster.files import STATE_MODE, process_start_time, write_atomic_text
from submit.base import EXIT_HOLD, EXIT_RETRY


def last_log_line(path: Path, limit: int = 8192) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def supervise(job_dir: Path, job_id: str, max_retries: int, cmd: list[str]) -> int:
    state_file = job_dir / f"{job_id}.state"
    err_log = Path(os.environ.get("SALVUS_LOCAL_ERR_LOG", "/dev/null"))
    stop = {"requested": False}
    child: dict[str, subprocess.Popen | None] = {"p": None}

    def write(**fields: object) -> None:
        write_atomic_text(state_file, json.dumps({"job_id": job_id, "supervisor": os.getpid(),
                                                  "updated": time.time(), **fields}), STATE_MODE)

    def on_signal(signum: int, _frame: object) -> None:
        stop["requested"] = True
        p = child["p"]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)  # the wrapper turns this into a clean guest shutdown

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    attempt = 0
    while True:
        attempt += 1
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        child["p"] = p
        # The wrapper's start time with its pid: the reaper finds an orphaned wrapper by both.
        write(state="running", wrapper_pid=p.pid, wrapper_start=process_start_time(p.pid), attempt=attempt)
        if stop["requested"]:
            p.send_signal(signal.SIGTERM)
        rc = p.wait()
        if stop["requested"] or rc == 0:
            write(state="done", exit_code=rc, attempt=attempt)
            return 0
        if rc == EXIT_RETRY and attempt <= max_retries:
            write(state="queued", exit_code=rc, attempt=attempt,
                  reason=f"retrying after exit 75: {last_log_line(err_log)}")
            time.sleep(min(30, 2 ** attempt))
            if stop["requested"]:
                write(state="done", exit_code=rc, attempt=attempt)
                return 0
            continue
        reason = f"salvus-vmjob exited {rc}: {last_log_line(err_log) or 'see ' + str(err_log)}"
        write(state="held" if rc in EXIT_HOLD or rc == EXIT_RETRY else "failed",
              exit_code=rc, attempt=attempt, reason=reason)
        return rc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sep = argv.index("--")
    job_dir, job_id, max_retries = argv[:sep]
    return supervise(Path(job_dir), job_id, int(max_retries), argv[sep + 1:])


if __name__ == "__main__":
    sys.exit(main())
