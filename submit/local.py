"""The local executor: runs wrappers as detached processes on this machine (the default backend).

Each job is a supervisor (`submit.localrun`) in its own session, so it outlives the CLI and a
terminal's ^C never reaches it; it runs `salvus-vmjob` and applies the retry policy. State lives in
STORE/state/local-jobs/: `ID.json` (written only by the CLI: role, service id, image, walltime and
the job it waits for before the supervisor starts, then its pid and start time), `ID.state`
(written only by the supervisor: state, reason, when it first ran, how it ended), `ID.cancel`
(cancel requested). The supervisor enforces the walltime and waits for a predecessor (localrun).
Logs go to STORE/logs/ID.out and ID.err.

Ours are the processes this site's CLI started as `Backend.submit_user`: only `ID.json` files that
user owns are read (job users may write state/ too), so another user's records, whatever they say,
are never listed, counted, cancelled or reaped.
"""
from __future__ import annotations

import json
import logging
import os
import pwd
import secrets
import stat
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable

from cluster.errors import SpecError
from cluster.spec import ClusterSpec
from cluster.files import STATE_MODE, open_append, process_start_time, write_atomic_text
from cluster.store import Store
from cluster.yamlmodel import is_image_ref
from submit.base import CLEANUP_GRACE_S, Backend, Job, quote, wrapper_path
from submit.runner import CommandRunner

log = logging.getLogger(__name__)

ENDED_BY = ("walltime", "cancel", "exit")


def _positive(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


class LocalBackend(Backend):
    name = "local"
    dependencies = True  # the supervisor waits for the predecessor's supervisor and wrapper to end

    def __init__(self, spec: ClusterSpec, runner: CommandRunner | None = None) -> None:
        super().__init__(spec, runner)
        self.dir = Store.of(spec).runtime.local_jobs_dir

    def render(self, role: str, service_id: str | None = None) -> str:
        """The command line the local executor runs (there is no job description to submit)."""
        self.role(role)
        sid = service_id or f"{role}-$SALVUS_LOCAL_JOB_ID"
        return (f"SALVUS_LOCAL_JOB_ID=<id> {quote(wrapper_path(self.spec))} --spec {quote(self.spec.source)} "
                f"--role {role} --image {quote(self.job_image(role))} --service-id {sid}\n")

    def prepare_submit(self, role: str) -> None:
        self.role(role)
        wrapper = wrapper_path(self.spec)
        if not os.access(wrapper, os.X_OK):
            raise SpecError(f"scheduler.wrapper: {wrapper}: not an executable file")
        super().prepare_submit(role)
        self.dir.mkdir(parents=True, exist_ok=True)

    def submit_one(self, role: str, service_id: str | None, after: str = "") -> str:
        job_id = f"{int(time.time())}-{secrets.token_hex(3)}"
        job = self.new_job(role, service_id, job_id)
        res = self.resources(role)
        job.walltime_s, job.after = res.walltime_s, after
        logs = self.log_dir()
        out, err = logs / f"{job_id}.out", logs / f"{job_id}.err"
        record = {**job.to_dict(), "stdout": str(out), "stderr": str(err), "pid": None}
        # Recorded before it starts, so a crash between the two never leaves an untracked job.
        write_atomic_text(self.dir / f"{job_id}.json", json.dumps(record), STATE_MODE)
        env = {**self.job_env(job.service_id), "SALVUS_LOCAL_JOB_ID": job_id, "SALVUS_LOCAL_ERR_LOG": str(err)}
        limits = ["--grace", str(res.grace_s)] + (["--walltime", str(res.walltime_s)] if res.walltime_s else [])
        cmd = [sys.executable, "-m", "submit.localrun", str(self.dir), job_id,
               str(self.spec.scheduler.max_retries), *limits, *(["--after", after] if after else []), "--",
               wrapper_path(self.spec), "--spec", self.spec.source, "--role", role, "--image", self.job_image(role),
               "--service-id", job.service_id]
        with open_append(out, STATE_MODE) as fo, open_append(err, STATE_MODE) as fe:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, env=env,
                                    start_new_session=True, cwd="/")
        # Reap it if this process lives on (tests, `demo`); a CLI just exits and init adopts it.
        threading.Thread(target=proc.wait, daemon=True).start()
        record.update(pid=proc.pid, pid_start=process_start_time(proc.pid))
        write_atomic_text(self.dir / f"{job_id}.json", json.dumps(record), STATE_MODE)
        log.debug("local job %s: supervisor pid %d", job_id, proc.pid)
        return job_id

    def record(self, job: Job) -> None:
        """Nothing more to record: submit_one wrote the job's record before starting it."""

    def _owner_uid(self) -> int:
        """The uid whose job records are ours (`submit_user`)."""
        try:
            return pwd.getpwnam(self.submit_user).pw_uid
        except KeyError:
            raise SpecError(f"{self.spec.source}: scheduler.submit_user: no user {self.submit_user!r} "
                            "on this machine") from None

    def _read_record(self, path: Path, uid: int) -> dict | None:
        """A job record if it is a plain file `uid` owns (else another user's, or not a record)."""
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
                return None
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("ignoring unreadable local job record %s", path)
            return None

    def _records(self) -> list[dict]:
        uid = self._owner_uid()
        paths = sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []
        return [rec for rec in (self._read_record(p, uid) for p in paths) if rec is not None]

    def _state(self, job_id: str) -> dict:
        try:
            return json.loads((self.dir / f"{job_id}.state").read_text())
        except (OSError, ValueError):
            return {}

    def _alive(self, rec: dict) -> bool:
        pid, started = rec.get("pid"), rec.get("pid_start")
        return bool(pid) and started is not None and process_start_time(pid) == started

    def _orphan_pid(self, rec: dict, st: dict) -> int | None:
        """The pid of the job's wrapper when it runs on without its supervisor (SIGKILLed): its VM
        heartbeats on, and nobody would stop it."""
        if st.get("state") in ("done", "failed", "held") or self._alive(rec):
            return None
        return self._wrapper_pid(rec, st)

    def _wrapper_pid(self, rec: dict, st: dict) -> int | None:
        """The pid of the job's wrapper while it runs, checked to be ours and this job's."""
        pid, started = st.get("wrapper_pid"), st.get("wrapper_start")
        if not (isinstance(pid, int) and pid > 1 and started is not None and process_start_time(pid) == started):
            return None
        # The records are files in state/, which job users may write: signal only a process of
        # ours that is this job's wrapper by its own command line, whatever a record claims.
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            mine = os.stat(f"/proc/{pid}").st_uid == os.geteuid()
        except OSError:
            return None
        sid = str(rec.get("service_id") or "").encode()
        return pid if mine and sid and b"--service-id" in argv and sid in argv else None

    def _job(self, rec: dict) -> Job:
        st = self._state(rec["job_id"])
        job = Job(rec["job_id"], rec["role"], "queued", rec.get("service_id"), rec["submitted"],
                  backend=self.name)
        # The records are files in state/, which job users may write: only well-formed values.
        job.image = rec["image"] if isinstance(rec.get("image"), str) and is_image_ref(rec["image"]) else ""
        job.walltime_s = _positive(rec.get("walltime_s"))
        job.after = rec["after"] if isinstance(rec.get("after"), str) else ""
        final = st.get("state") in ("done", "failed", "held")
        if final:
            job.state, job.hold_reason = st["state"], st.get("reason", "")
            job.ended_by = st["ended_by"] if st.get("ended_by") in ENDED_BY else ""
        elif self._orphan_pid(rec, st) is not None:
            # Still capacity (a second VM beside it would be a duplicate) until the reaper stops it.
            cancelled = (self.dir / f"{rec['job_id']}.cancel").exists()
            job.state = "stopping" if cancelled else "running"
            job.hold_reason = "its supervisor is gone; the reaper stops it"
        elif self._alive(rec):
            if (self.dir / f"{rec['job_id']}.cancel").exists():
                job.state = "stopping"
            else:
                job.state = st.get("state", "queued")
                job.hold_reason = st.get("reason", "") if job.state == "queued" else ""
        elif rec.get("pid") is None and time.time() - rec["submitted"] < 30:
            job.state = "queued"  # being started right now
        else:
            job.state = "failed"
            job.hold_reason = "the job's supervisor is gone without a final state (killed?)"
        if job.state in ("running", "stopping"):
            # When it first ran: the local walltime runs on across exit-75 retries, like a batch limit.
            job.started = _positive(st.get("started"))
        return job

    def list(self, role: str | None = None) -> list[Job]:
        return [self._job(r) for r in self._records() if role is None or r.get("role") == role]

    def cancel(self, job: Job) -> None:
        rec = self._record(job.job_id)
        if rec is None:
            return
        if self._orphan_pid(rec, self._state(job.job_id)) is not None:
            self._stop_orphan(rec, "cancelled")
            return
        if job.state in ("held", "failed", "done") or not self._alive(rec):
            self.forget(job)
            return
        (self.dir / f"{job.job_id}.cancel").touch()
        os.kill(rec["pid"], signal.SIGTERM)  # the supervisor forwards it to the wrapper only

    def kill(self, job: Job) -> None:
        """Last resort after the grace period: SIGKILL the job's process groups (the supervisor's
        and its wrapper's own)."""
        rec = self._record(job.job_id)
        if rec and self._alive(rec):
            wrapper = self._wrapper_pid(rec, self._state(job.job_id))
            for group in ([wrapper] if wrapper else []) + [rec["pid"]]:
                try:
                    os.killpg(group, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        elif rec and (pid := self._orphan_pid(rec, self._state(job.job_id))) is not None:
            os.kill(pid, signal.SIGKILL)  # its QEMU dies with it (PR_SET_PDEATHSIG)

    def _stop_orphan(self, rec: dict, why: str) -> None:
        """SIGTERM to the wrapper itself: it shuts its guest down and deregisters as on a cancel."""
        pid = self._orphan_pid(rec, self._state(rec["job_id"]))
        if pid is None:
            return
        (self.dir / f"{rec['job_id']}.cancel").touch()
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        log.info("local job %s: %s: wrapper pid %d runs without its supervisor: SIGTERM", rec["job_id"], why, pid)

    def reap(self, roles: Iterable[str] | None = None) -> list[str]:
        """Wrappers whose supervisor is gone get SIGTERM (a clean guest shutdown), SIGKILL once
        the role's stop_timeout and the clean-up grace have passed; once a wrapper is gone the job
        gets the final state its supervisor would have written, and its registry row (if the
        wrapper could not deregister) is removed."""
        wanted = set(roles) if roles is not None else None
        events = []
        for rec in self._records():
            job_id, role = rec.get("job_id"), rec.get("role")
            if not isinstance(job_id, str) or (wanted is not None and role not in wanted):
                continue
            st = self._state(job_id)
            cancel = self.dir / f"{job_id}.cancel"
            pid = self._orphan_pid(rec, st)
            if pid is not None:
                if not cancel.exists():
                    self._stop_orphan(rec, "reaped")
                    events.append(f"reaped {role} job {job_id} ({rec.get('service_id')}): its supervisor is "
                                  f"gone; SIGTERM to its wrapper (pid {pid})")
                elif time.time() - cancel.stat().st_mtime > self.spec.stop_timeout(role) + CLEANUP_GRACE_S:
                    os.kill(pid, signal.SIGKILL)
                    events.append(f"reaped {role} job {job_id}: its wrapper (pid {pid}) outlived its "
                                  "stop_timeout: SIGKILL")
            elif (st.get("wrapper_pid") and st.get("state") not in ("done", "failed", "held")
                  and not self._alive(rec) and cancel.exists()):
                # The orphan we stopped is gone: record what its supervisor would have.
                write_atomic_text(self.dir / f"{job_id}.state", json.dumps(
                    {**st, "state": "failed", "updated": time.time(),
                     "reason": "reaped: its supervisor was gone; the wrapper was stopped"}), STATE_MODE)
                self._deregister_if_ours(rec)
                events.append(f"reaped {role} job {job_id} ({rec.get('service_id')}): its wrapper is gone")
        return events

    def _deregister_if_ours(self, rec: dict) -> None:
        from cluster.errors import RegistryUnavailable
        from cluster.registry import open_registry

        sid = rec.get("service_id")
        try:
            with open_registry(self.spec) as reg:
                row = reg.get(sid) if isinstance(sid, str) else None
                if row is not None and row.scheduler == self.name and row.job_id == rec["job_id"]:
                    reg.deregister(sid)
        except RegistryUnavailable as e:
            log.warning("local job %s: could not deregister %s (its row expires by itself): %s", rec["job_id"], sid, e)

    def forget(self, job: Job) -> None:
        for suffix in (".json", ".state", ".cancel"):
            (self.dir / f"{job.job_id}{suffix}").unlink(missing_ok=True)

    def recorded_ids(self) -> set[str]:
        return {r["job_id"] for r in self._records()}

    def known_but_not_listed(self, role: str | None, listed: list[Job]) -> list[Job]:
        return []  # the records are the queue itself

    def _record(self, job_id: str) -> dict | None:
        return self._read_record(self.dir / f"{job_id}.json", self._owner_uid())
