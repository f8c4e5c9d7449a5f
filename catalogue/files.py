"""Small file helpers shared by the catalogue modules: bounded reads and a lock."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from cluster.errors import DataError


def read_limited(path: Path, max_bytes: int) -> bytes:
    """The file's bytes, refusing (DataError) before reading more than `max_bytes` of it."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise DataError(f"{path}: larger than the limit of {max_bytes} bytes; refused unread")
    return data


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so two writers' read-check-replace sequences do not interleave."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
