"""Small file-system helpers: free space, sparse sizes, directory fsync, boot time."""
from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path, flags: int = 0, data_only: bool = False) -> None:
    """fsync by path (a file's data and inode, or with O_DIRECTORY a directory's entries);
    `data_only`: fdatasync, the data without the timestamps."""
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        (os.fdatasync if data_only else os.fsync)(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fsync_path(path, os.O_DIRECTORY)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def allocated_bytes(path: Path) -> int:
    """Bytes a (possibly sparse) file already occupies on disk."""
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def boot_time() -> float:
    """Epoch seconds of the last boot (`btime` in /proc/stat)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0
