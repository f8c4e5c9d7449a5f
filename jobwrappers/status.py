"""`STORE/state/jobs/<service_id>.json`: what a running wrapper is doing, for `status` to show
endpoints of jobs that have not registered yet. Written by rename, removed on exit."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.files import write_atomic


@dataclass
class JobStatus:
    service_id: str
    role: str
    job_id: str
    pid: int
    state: str  # booting | running | stopping
    endpoint: str
    console_log: str
    started: float = field(default_factory=time.time)
    # What imgdist's gc must not remove while this VM runs: its base image and its overlay's folder.
    image: str = ""  # NAME@VERSION
    workdir: str = ""


def status_path(store: Path, service_id: str) -> Path:
    return store / "state" / "jobs" / f"{service_id}.json"


def write_status(store: Path, status: JobStatus) -> Path:
    path = status_path(store, status.service_id)
    write_atomic(path, (json.dumps(asdict(status)) + "\n").encode())
    return path


def remove_status(store: Path, service_id: str, pid: int) -> None:
    """Removes the file only if it is still ours (a newer job may have taken the service id)."""
    path = status_path(store, service_id)
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError):
        pass
