"""Disk files for one VM: the copy-on-write overlay on a read-only base, and persistent disks."""
from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from cluster.errors import DataError, SpecError
from cluster.files import PRIVATE_MODE
from cluster.spec import DiskSpec
from cluster.store import Store

log = logging.getLogger(__name__)


def image_format(path: Path) -> str:
    """The base's format from its name, never from its content: a raw image whose first bytes look
    like a qcow2 header must not be able to point QEMU at another file as its backing store."""
    return "raw" if path.suffix in (".raw", ".img") else "qcow2"


def _qemu_img(*args: str) -> None:
    try:
        proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    except OSError as e:
        raise SpecError(f"cannot run qemu-img: {e.strerror} (install qemu-utils: scripts/setup)") from None
    if proc.returncode != 0:
        raise DataError(f"qemu-img {args[0]}: {proc.stderr.strip()}")


def create_overlay(base: Path, overlay: Path) -> Path:
    """A qcow2 overlay whose backing file is the base by absolute path (a relative one would resolve
    against the overlay's own directory). The guest writes only to the overlay."""
    base = base.resolve()
    _qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", image_format(base), str(overlay))
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
