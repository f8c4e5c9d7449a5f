"""sha256 of image files, remembered per (path, size, mtime, ctime, inode, device).

Hashing a 1 GiB base image takes about a second of CPU; a host boots the same image many times.
A cached digest is reused only while the file's identity and change stamps are all unchanged: a
rewrite changes size or mtime, a replace-by-rename changes the inode, and `touch -d` to fake an old
mtime still moves ctime (which user space cannot set), so any change means a re-hash.
The cache is one JSON file in `STORE/state/`, replaced atomically; two writers racing lose at most
one entry, which only costs a re-hash later. Stamps cannot see writes through an already-dirty shared
mmap, so callers remember digests only of files nobody but the store's owner can write
(`catalogue.imagefile` StrictModes); keys are the real path the descriptor was opened at.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from cluster.files import write_atomic

log = logging.getLogger(__name__)

MAX_CACHE_BYTES = 8 << 20
CHUNK = 1 << 20


def file_stamp(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino, "dev": st.st_dev}


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _load(cache_path: Path) -> dict[str, dict]:
    try:
        if cache_path.stat().st_size > MAX_CACHE_BYTES:
            return {}
        data = json.loads(cache_path.read_bytes())
    except (OSError, ValueError):
        return {}  # a missing or damaged cache is only a reason to hash again
    return data if isinstance(data, dict) else {}


def cached_sha256(cache_path: Path, path: Path, st: os.stat_result) -> str | None:
    """The remembered digest of `path` if its stamps still match `st` (the fstat of the descriptor
    about to be booted), else None."""
    rec = _load(cache_path).get(str(path))
    stamp = file_stamp(st)
    if isinstance(rec, dict) and {k: rec.get(k) for k in stamp} == stamp and isinstance(rec.get("sha256"), str):
        return rec["sha256"]
    return None


def sha256_fd(fd: int) -> str:
    """sha256 of the whole file open at `fd`, read with pread (the descriptor's offset is untouched)."""
    h, offset = hashlib.sha256(), 0
    while chunk := os.pread(fd, CHUNK, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def hash_fd_with_stamp(fd: int, source: str) -> tuple[str, dict[str, int]]:
    """The digest of the open file and its stamps taken around it; if it changed while being read, hash again."""
    for _ in range(3):
        before = file_stamp(os.fstat(fd))
        digest = sha256_fd(fd)
        if file_stamp(os.fstat(fd)) == before:
            return digest, before
    raise OSError(f"{source}: keeps changing while being hashed")


def remember(cache_path: Path, path: Path, digest: str, stamp: dict[str, int]) -> None:
    data = _load(cache_path)
    data = {k: v for k, v in data.items() if os.path.exists(k)}  # forget deleted images
    data[str(path)] = {**stamp, "sha256": digest}
    try:
        write_atomic(cache_path, json.dumps(data, indent=1, sort_keys=True).encode())
    except OSError as e:
        log.warning("cannot update the hash cache %s: %s (the next check hashes again)", cache_path, e)
