"""Which base images running VMs use, so gc never removes one.

Independent signs, any one is enough:
- the wrapper's status files `STORE/state/jobs/*.json` whose pid is alive: the role's image
  (or the file's own `image` field when a wrapper records it);
- the backing chain of the overlays in the job's `workdir`;
- QEMU processes holding a base image open (/proc/PID/fd): QEMU opens the whole backing chain,
  so this catches a VM still running an older version after the role moved on.
"""
from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

from cluster import jobstatus
from cluster.jobstatus import JobStatus
from cluster.spec import ClusterSpec, split_image_ref
from cluster.store import Store

log = logging.getLogger(__name__)

QCOW2_MAGIC = b"QFI\xfb"


def qcow2_backing_file(path: Path) -> Path | None:
    """The backing file named in a qcow2 header (read directly: `qemu-img info` on an image a
    running QEMU holds needs --force-share and a process per file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
            if len(head) < 20 or head[:4] != QCOW2_MAGIC:
                return None
            offset, size = struct.unpack(">QI", head[8:20])
            if not offset or not 0 < size <= 4096:
                return None
            f.seek(offset)
            name = f.read(size).decode("utf-8", "replace")
    except OSError:
        return None
    p = Path(name)
    return p if p.is_absolute() else path.parent / p


def _base_names(store: Store, paths: list[Path]) -> set[str]:
    """File names under images/base/ among `paths`, following backing chains a few levels."""
    base = store.base.resolve()
    found: set[str] = set()
    for p in paths:
        for _ in range(8):
            try:
                rp = p.resolve()
            except OSError:
                break
            if rp.parent == base:
                found.add(rp.name)
                break
            nxt = qcow2_backing_file(rp)
            if nxt is None:
                break
            p = nxt
    return found


def _job_image_files(spec: ClusterSpec, job: JobStatus | None) -> set[str]:
    """Base image files a job uses; '*' (everything) for a job that cannot be identified."""
    if job is None:
        return {"*"}
    ref = job.image
    if not ref:
        role = spec.roles.get(job.role)
        ref = role.image if role else ""
    try:
        name, version = split_image_ref(ref)
    except ValueError:
        return {"*"}
    return {f"{name}-{version}.qcow2", f"{name}-{version}.raw"}


def _overlays(job: JobStatus | None) -> list[Path]:
    if job is None or not job.workdir:
        return []
    try:
        return [p for p in Path(job.workdir).iterdir() if p.suffix == ".qcow2"]
    except OSError:
        return []


def _qemu_open_files() -> list[Path]:
    out = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            if not (pid_dir / "comm").read_text().startswith("qemu"):
                continue
            out += [Path(os.readlink(fd)) for fd in (pid_dir / "fd").iterdir()]
        except OSError:
            continue
    return out


def images_in_use(spec: ClusterSpec, store: Store) -> dict[str, int]:
    """Base image file name -> number of running VMs using it ('*' = an unidentifiable job)."""
    counts: dict[str, int] = {}
    for _, job in jobstatus.read_all(store):
        names = _job_image_files(spec, job) | _base_names(store, _overlays(job))
        for n in names:
            counts[n] = counts.get(n, 0) + 1
    for n in _base_names(store, _qemu_open_files()):
        counts.setdefault(n, 1)
    return counts


def in_use(counts: dict[str, int], file_name: str) -> bool:
    return "*" in counts or counts.get(file_name, 0) > 0
