"""Disk files for one VM: the copy-on-write overlay on a read-only base, and persistent disks."""
from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from catalogue.imagefile import OpenImage
from cluster.errors import DataError, SpecError, TempFailure
from cluster.files import PRIVATE_MODE, out_of_space
from cluster.spec import DiskSpec
from cluster.store import Store

log = logging.getLogger(__name__)


def _qemu_img(*args: str) -> None:
    try:
        proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    except OSError as e:
        raise SpecError(f"cannot run qemu-img: {e.strerror} (install qemu-utils: scripts/setup)") from None
    if proc.returncode != 0:
        detail = proc.stderr.strip()
        if out_of_space(detail):  # a full scratch or store: another host (or later) may have room
            raise TempFailure(f"qemu-img {args[0]}: {detail}")
        raise DataError(f"qemu-img {args[0]}: {detail}")


def create_overlay(base: OpenImage, overlay: Path) -> Path:
    """A qcow2 overlay of the base's virtual size with NO backing file in its header: the runner
    gives it the verified base as its backing node (opened from the checked descriptor, with the
    signed entry's format), so nothing re-opens the base by name or probes its format. The guest
    writes only to the overlay."""
    _qemu_img("create", "-q", "-f", "qcow2", str(overlay), str(base.virtual_size))
    return overlay


def ensure_persistent_disk(store: Store, service_id: str, disk: DiskSpec) -> Path:
    """`STORE/persistent/SERVICE_ID/NAME.qcow2`, created sparse on first use (atomically, so a crash
    never leaves a half-made disk under the real name); the wrapper never deletes it."""
    path = store.persistent_disk(service_id, disk.name)
    if path.exists():
        return path
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    _qemu_img("create", "-q", "-f", "qcow2", str(tmp), f"{disk.size_mb}M")
    try:
        # qemu-img creates with the umask (0644): the guest's data is the job user's only, and
        # it is private before it has its real name.
        os.chmod(tmp, PRIVATE_MODE)
        # link, not rename: if another job created it meanwhile, keep theirs (it may hold data).
        os.link(tmp, path)
        log.info("created persistent disk %s (%d MiB, sparse)", path, disk.size_mb)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path
