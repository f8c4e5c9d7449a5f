"""Space checks before a pull and the atomic, read-only install of a verified image."""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cluster.errors import DataError, TempFailure
from catalogue import hashcache
from catalogue.index import Entry, check_virtual_size
from catalogue.qcow2 import check_image_header
from cluster.files import allocated_bytes, free_bytes, fsync_dir
from cluster.store import Store

log = logging.getLogger(__name__)

MiB = 1 << 20


class NoSpace(TempFailure):
    """The image would not fit; nothing was written."""


def check_space(store: Store, file_name: str, size: int, reserve: int) -> None:
    """Refuses a pull that would not fit (image minus what the partial file already holds,
    plus the reserve) before a single byte is written."""
    store.partial.mkdir(parents=True, exist_ok=True)
    have = allocated_bytes(store.partial / file_name)
    need = max(size - have, 0) + reserve
    free = free_bytes(store.partial)
    if need > free:
        raise NoSpace(f"{store.partial}: {file_name} needs {need / MiB:.0f} MiB "
                      f"({size / MiB:.0f} MiB image + {reserve / MiB:.0f} MiB reserve"
                      f"{f' - {have / MiB:.0f} MiB already pulled' if have else ''}), "
                      f"only {free / MiB:.0f} MiB free; not pulling")


def install(store: Store, entry: Entry, hash_cache: Path | None = None) -> Path:
    """Moves images/partial/FILE into images/base/ read-only once its bytes match the signed entry
    and its header passes `catalogue.qcow2`'s rules for the entry's format (no backing file, no
    external data file, no unknown incompatible feature) and gives the entry's virtual size, all
    read from one descriptor. A compressed qcow2 is installed as it is.

    Raises DataError (and leaves the partial file for a recheck) when they don't. With `hash_cache`
    (the wrapper's pre-boot cache) the digest just computed is remembered for the installed file,
    so the first boot does not hash the image a second time.
    """
    src = store.partial / entry.file_name
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        actual_size = os.fstat(fd).st_size
        if actual_size != entry.size:
            raise DataError(f"{src}: {actual_size} bytes, the signed index says {entry.size}")
        # The fsync runs while the file is hashed: the bytes no longer change once the torrent is
        # removed from the session. The pull wrote most pages back already (swarm.WRITEBACK_EVERY).
        with ThreadPoolExecutor(1) as pool:
            written = pool.submit(os.fsync, fd)
            digest, stamp = hashcache.hash_fd_with_stamp(fd, str(src))
            written.result()
        if digest != entry.sha256:
            raise DataError(f"{src}: sha256 {digest} does not match the signed index ({entry.sha256})")
        check_virtual_size(entry, check_image_header(fd, entry.format, str(src)), str(src))
        os.fchmod(fd, 0o444)
        os.fsync(fd)  # the mode; the data are already on disk
        store.base.mkdir(parents=True, exist_ok=True)
        dst = store.base / entry.file_name
        os.replace(src, dst)  # same file system: readers see no file or the whole verified one
        fsync_dir(store.base)
        fsync_dir(store.partial)
        now = os.fstat(fd)
    finally:
        os.close(fd)
    if hash_cache is not None:
        now_stamp = hashcache.file_stamp(now)
        # chmod and rename move only ctime; anything else changing means the bytes hashed are not
        # known to be the bytes installed, so nothing is remembered (the boot hashes again).
        if {k: v for k, v in now_stamp.items() if k != "ctime_ns"} == {k: v for k, v in stamp.items() if k != "ctime_ns"}:
            hashcache.remember(hash_cache, Path(os.path.realpath(dst)), digest, now_stamp)
    log.info("installed %s (sha256 %s)", dst, digest[:16])
    return dst
