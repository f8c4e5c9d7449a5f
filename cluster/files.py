"""File and process helpers every part shares: atomic replacement, bounded reads, one flock helper,
fsync by path, free space, and the kernel's identity of a process.

State files are replaced by rename, never rewritten in place, so a reader sees the old file or the
new one; every lock is one `flock` on a file beside the state it guards. Some of those directories
are writable by job users, so nothing here follows a symlink or reuses a name another user can
predict: temp files are `mkstemp`'s (random name, `O_EXCL|O_NOFOLLOW`), locks are opened
`O_NOFOLLOW` and must be plain files.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from cluster.errors import DataError, TempFailure


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Readers see the old file or the new one, never half of one (temp + fsync + rename). The
    temp name is random and created exclusively (a planted symlink or file cannot receive the
    data); the rename replaces a symlink at `path` itself, never its target. `mode` is applied
    exactly (fchmod), not through the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic_text(path: Path, text: str, mode: int = 0o644) -> None:
    write_atomic(path, text.encode(), mode)


def read_limited(path: Path, max_bytes: int, owners: frozenset[int] | None = None, what: str = "") -> bytes:
    """The file's bytes, refusing (DataError) before reading more than `max_bytes` of it, and
    refusing anything but a regular file (a FIFO, /dev/zero, a directory). With `owners` (trust
    state) the file must be a plain file reached without a symlink, owned by one of `owners` and
    writable by nobody else (checked on the open descriptor). `what` names the file in messages
    ("spec": "cannot read spec: ...", "spec larger than ...")."""
    noun = f" {what}" if what else ""
    try:
        # O_NONBLOCK: a FIFO with no writer opens at once instead of hanging, and is refused
        # below; only a regular file's size is known before reading.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (os.O_NOFOLLOW if owners is not None else 0))
    except OSError as e:
        if e.errno == errno.ELOOP and owners is not None:
            raise DataError(f"{path}: is a symlink; trust state must be a plain file") from None
        raise DataError(f"{path}: cannot read{noun}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if owners is not None:
            check_owned(path, st, owners)
        if not stat.S_ISREG(st.st_mode):  # before fdopen, which refuses a directory with a traceback
            raise DataError(f"{path}: cannot read{noun}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise DataError(f"{path}: cannot read{noun}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise DataError(f"{path}:{noun} larger than the limit of {max_bytes} bytes; refused unread")
    return data


def check_owned(path: Path, st: os.stat_result, owners: frozenset[int], sticky_ok: bool = False) -> None:
    """DataError unless `st` (of `path`, not followed through a symlink) is a plain file or a
    directory owned by one of `owners` and writable by no one else (sshd's StrictModes); a
    `sticky_ok` directory may be writable by others when its sticky bit stops them renaming."""
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise DataError(f"{path}: not a plain file or directory; refused as trust state")
    if st.st_uid not in owners:
        raise DataError(f"{path}: owned by uid {st.st_uid}, not by the store's owner "
                        f"(uid {' or '.join(str(o) for o in sorted(owners))}); refused as trust state")
    if st.st_mode & 0o022 and not (sticky_ok and st.st_mode & stat.S_ISVTX):
        raise DataError(f"{path}: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                        "trust state must be writable only by the store's owner (chmod go-w)")


class LockBusy(TempFailure):
    """Another process holds a lock taken with `wait=False`."""


def _open_lock(lock_path: Path, flags: int) -> int:
    """An fd on the lock file, refusing a symlink (O_NOFOLLOW) and anything but one plain file: a
    job user could otherwise point a root-owned lock, which `record_pid` truncates, at any file."""
    try:
        fd = os.open(lock_path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(f"{lock_path}: is a symlink; refused as a lock file (remove it)") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise DataError(f"{lock_path}: not a plain file with one link; refused as a lock file (remove it)")
    return fd


@contextlib.contextmanager
def locked(lock_path: Path, wait: bool = True, busy: str = "", record_pid: bool = False,
           error: type[LockBusy] = LockBusy) -> Iterator[None]:
    """An exclusive advisory lock on `lock_path`, so two writers' read-check-replace sequences
    never interleave. `wait=False` raises `error`(`busy` or a default line) instead of queueing;
    `record_pid` writes the holder's pid into the file for `lock_holder`."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_lock(lock_path, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise error(busy or f"{lock_path}: held by another process") from None
        if record_pid:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def lock_holder(lock_path: Path) -> int | None:
    """The pid recorded by the process holding `lock_path` (see `locked(record_pid=True)`), or None
    when nobody holds it."""
    try:
        fd = _open_lock(lock_path, os.O_RDONLY)
    except (FileNotFoundError, DataError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return int(os.read(fd, 32).decode().strip() or 0) or None
            except ValueError:
                return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


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


# Modes of what the store writes (the list is cluster/store.py's): runtime state and logs an
# operator group may read, never the world (what runs where, a guest's console); private data the
# owner's only. Trust state and the layout file keep write_atomic's 0644: every job user's wrapper
# reads them, nothing there is secret, and only their owner may write them.
STATE_MODE = 0o640
PRIVATE_MODE = 0o600


def open_append(path: Path, mode: int) -> BinaryIO:
    """`path` opened for appending (a log), created with `mode` when it is new."""
    return open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode), "ab")


# What a full file system (or quota) looks like in a tool's stderr: the C library's own words.
_NO_SPACE = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))


def out_of_space(detail: str) -> bool:
    """True when a tool's error text says its file system or quota is full: a host's trouble
    (exit 75, retry elsewhere), not the image's or the spec's."""
    return any(words in detail for words in _NO_SPACE)


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


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), None when it is gone or a zombie;
    with the pid it identifies a process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] in ("Z", "X"):
            return None
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
