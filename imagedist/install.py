"""Space checks before a pull and the atomic, read-only install of a verified image."""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cluster.errors import DataError, TempFailure
from catalogue import hashcache
from cluster.files import allocated_bytes, free_bytes, fsync_dir, fsync_path
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


def install(store: Store, file_name: str, size: int, sha256: str, hash_cache: Path | None = None) -> Path:
    """Moves images/partial/FILE into images/base/ read-only once its bytes match the index.

    Raises DataError (and leaves the partial file for a recheck) when they don't. With `hash_cache`
    (the wrapper's pre-boot cache) the digest just computed is remembered for the installed file,
    so the first boot does not hash the image a second time.
    """
    src = store.partial / file_name
    actual_size = src.stat().st_size
    if actual_size != size:
        raise DataError(f"{src}: {actual_size} bytes, the signed index says {size}")
    # The fsync runs while the file is hashed: the bytes no longer change once the torrent is
    # removed from the session. The pull wrote most pages back already (swarm.WRITEBACK_EVERY).
    with ThreadPoolExecutor(1) as pool:
        written = pool.submit(fsync_path, src)
        digest, stamp = hashcache.hash_with_stamp(src)
        written.result()
    if digest != sha256:
        raise DataError(f"{src}: sha256 {digest} does not match the signed index ({sha256})")
    os.chmod(src, 0o444)
    fsync_path(src)  # the mode; the data are already on disk
    store.base.mkdir(parents=True, exist_ok=True)
    dst = store.base / file_name
    os.replace(src, dst)  # same file system: readers see no file or the whole verified one
    fsync_dir(store.base)
    fsync_dir(store.partial)
    if hash_cache is not None:
        now = hashcache.file_stamp(os.stat(dst))
        # chmod and rename move only ctime; anything else changing means the bytes hashed are not
        # known to be the bytes installed, so nothing is remembered (the boot hashes again).
        if {k: v for k, v in now.items() if k != "ctime_ns"} == {k: v for k, v in stamp.items() if k != "ctime_ns"}:
            hashcache.remember(hash_cache, dst, digest, now)
    log.info("installed %s (sha256 %s)", dst, digest[:16])
    return dst
