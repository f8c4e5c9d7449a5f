"""A running wrapper's status file, `STORE/state/jobs/SERVICE_ID.json`: the one contract between
the wrapper that writes it and the readers (`salvus_jobs status` for endpoints of jobs that have not
registered yet, imgdist's gc for the images running VMs use).

The wrapper replaces the file by rename at every state change (booting, running, stopping) and
removes it on exit; a file whose pid is dead is stale (the wrapper was SIGKILLed).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.files import STATE_MODE, pid_alive, write_atomic
from cluster.store import Store

log = logging.getLogger(__name__)

MAX_STATUS_BYTES = 1 << 16


@dataclass
class JobStatus:
    service_id: str
    role: str
    job_id: str
    pid: int
    state: str  # booting | running | stopping
    endpoint: str  # HOST:PORT, empty until the VM has one
    console_log: str
    started: float = field(default_factory=time.time)
    # What imgdist's gc must not remove while this VM runs: its base image and its overlay's folder.
    image: str = ""  # NAME@VERSION
    workdir: str = ""
    # The serial console's unix socket on this host (`salvus_jobs console` attaches to it).
    console_socket: str = ""

    def alive(self) -> bool:
        return self.pid > 0 and pid_alive(self.pid)

    @classmethod
    def from_json(cls, raw: bytes) -> "JobStatus":
        """ValueError unless `raw` is a status object with the fields' types (unknown fields, which
        a newer wrapper may add, are ignored)."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                value = data[f.name]
                want = {"int": int, "float": (int, float), "str": str}[str(f.type)]
                if not isinstance(value, want) or isinstance(value, bool):
                    raise ValueError(f"{f.name}: wrong type")
                kwargs[f.name] = value
        return cls(**kwargs)


def write(store: Store, status: JobStatus) -> Path:
    path = store.runtime.job_status(status.service_id)
    write_atomic(path, (json.dumps(asdict(status)) + "\n").encode(), STATE_MODE)
    return path


def remove(store: Store, service_id: str, pid: int) -> None:
    """Removes the file only if it is still ours (a newer job may have taken the service id)."""
    path = store.runtime.job_status(service_id)
    try:
        if json.loads(path.read_bytes()[:MAX_STATUS_BYTES]).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def read(store: Store, service_id: str) -> JobStatus | None:
    """The status of one service's wrapper, None when there is none or it is unreadable."""
    try:
        return JobStatus.from_json(store.runtime.job_status(service_id).read_bytes()[:MAX_STATUS_BYTES])
    except (OSError, ValueError, TypeError):
        return None


def read_all(store: Store, live_only: bool = True) -> list[tuple[Path, JobStatus | None]]:
    """Every status file as (path, status); status is None for a file that cannot be read (a reader
    that protects resources must treat it as unknown, not as absent). With `live_only`, files whose
    wrapper is dead are left out."""
    out: list[tuple[Path, JobStatus | None]] = []
    d = store.runtime.jobs_dir
    for f in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            st = JobStatus.from_json(f.read_bytes()[:MAX_STATUS_BYTES])
        except (OSError, ValueError, TypeError):
            log.warning("%s: unreadable job status", f)
            out.append((f, None))
            continue
        if live_only and not st.alive():
            continue
        out.append((f, st))
    return out
