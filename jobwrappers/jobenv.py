"""What the batch system tells a job: its id, its scratch directory, which scheduler runs it."""
from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from cluster.errors import SpecError
from cluster.files import process_start_time
from cluster.yamlmodel import is_service_id

PRIVATE_PREFIX = "salvus-vmjob-"
OWNER_FILE = "owner"


@dataclass
class JobEnv:
    job_id: str
    scheduler: str
    given_scratch: Path | None  # the batch system's scratch directory, if it gave one
    private_dir: Path | None = None  # made by this process (and removed) because none was given

    def scratch(self) -> Path:
        """The scratch directory; a private one is made on first use, so a job refused before it
        boots leaves nothing behind."""
        if self.given_scratch is not None:
            return self.given_scratch
        if self.private_dir is None:
            self.private_dir = Path(tempfile.mkdtemp(prefix=PRIVATE_PREFIX))
            (self.private_dir / OWNER_FILE).write_text(_process_identity(os.getpid()))
            sweep_stale_private_scratch(self.private_dir.parent)
        return self.private_dir

    def remove_private_scratch(self) -> None:
        if self.private_dir is not None:
            shutil.rmtree(self.private_dir, ignore_errors=True)
            self.private_dir = None


def _condor_job_id(env: Mapping[str, str]) -> str | None:
    if env.get("CONDOR_JOB_ID"):
        return env["CONDOR_JOB_ID"]
    ad = env.get("_CONDOR_JOB_AD")
    if not ad:
        return None
    attrs: dict[str, str] = {}
    try:
        for line in Path(ad).read_text(errors="replace").splitlines():
            key, sep, value = line.partition(" = ")
            if sep and key in ("ClusterId", "ProcId"):
                attrs[key] = value.strip()
    except OSError:
        return None
    return f"{attrs['ClusterId']}.{attrs.get('ProcId', '0')}" if "ClusterId" in attrs else None


def job_from_env(default_scheduler: str, env: Mapping[str, str] | None = None) -> JobEnv:
    env = os.environ if env is None else env
    found: tuple[str, str] | None = None
    condor = _condor_job_id(env)
    if condor:
        found = (condor, "condor")
    elif env.get("SLURM_JOB_ID"):
        found = (env["SLURM_JOB_ID"], "slurm")
    elif env.get("PBS_JOBID"):
        found = (env["PBS_JOBID"], "pbs")
    elif env.get("JOB_ID"):
        found = (env["JOB_ID"], default_scheduler if default_scheduler == "drmaa" else "sge")
    elif env.get("SALVUS_LOCAL_JOB_ID"):
        found = (env["SALVUS_LOCAL_JOB_ID"], "local")
    job_id, scheduler = found or (f"{socket.gethostname()}-{os.getpid()}", "none")
    scratch = env.get("_CONDOR_SCRATCH_DIR") or env.get("TMPDIR")
    return JobEnv(job_id, scheduler, Path(scratch) if scratch and Path(scratch).is_dir() else None)


def _process_identity(pid: int) -> str:
    """pid and kernel start time: still names the same process after the pid is reused ("" once
    it has exited, zombies included)."""
    start = process_start_time(pid)
    return f"{pid} {start}" if start is not None else ""


def sweep_stale_private_scratch(parent: Path) -> list[Path]:
    """Removes private scratch dirs of wrappers that were SIGKILLed (no scheduler cleans them):
    a batch system wipes its own scratch directories, nobody wipes these."""
    removed = []
    for d in parent.glob(f"{PRIVATE_PREFIX}*"):
        try:
            owner = (d / OWNER_FILE).read_text()
        except OSError:
            continue  # being created right now, or not ours
        pid = owner.split()[0] if owner.split() else ""
        if pid.isdigit() and _process_identity(int(pid)) != owner:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def default_service_id(role: str, job_id: str) -> str:
    tail = re.sub(r"[^A-Za-z0-9_.-]+", "-", job_id).strip("-.") or uuid.uuid4().hex[:8]
    return f"{role}-{tail}"[:64]


def check_service_id(service_id: str) -> str:
    if not is_service_id(service_id):
        raise SpecError(f"--service-id: expected letters, digits, '.', '_', '-' (at most 64, no '..'), "
                        f"got {service_id!r}")
    return service_id
