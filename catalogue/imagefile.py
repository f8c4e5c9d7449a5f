"""Open an image (or kernel/initrd) file once: the descriptor that is checked and hashed is the one
QEMU reads, so a rename between the check and the boot cannot swap the bytes.

`open_image` opens with O_RDONLY|O_NOFOLLOW and, with `owner` given (the store's owner, the only
account besides root that may change verified bytes), refuses like sshd's StrictModes: a file that is
not regular, has other hard links, is not owned by root or the owner, or is writable by group or
others, or any directory above it owned by someone else or writable by group/others (a sticky
world-writable directory such as /tmp is allowed: others cannot rename what they do not own there).
A descriptor nobody else can write through is also what makes a cached digest trustworthy.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import DataError
from catalogue.qcow2 import check_image_header


@dataclass
class OpenImage:
    """A verified (or, insecure mode, merely opened) file and the descriptor to hand QEMU."""

    path: Path
    fd: int
    format: str  # qcow2 | raw: from the signed entry (or the role's suffix rule), never probed
    virtual_size: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _trusted(st: os.stat_result, owner: int) -> bool:
    return st.st_uid in (0, owner)


def _check_dirs(path: Path, owner: int) -> None:
    for d in [path.parent, *path.parent.parents]:
        st = os.lstat(d)
        if not _trusted(st, owner):
            raise DataError(f"{path}: directory {d} is owned by uid {st.st_uid}, not root or the store's "
                            f"owner (uid {owner}); refused")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            raise DataError(f"{path}: directory {d} is writable by group or others "
                            f"(mode {stat.S_IMODE(st.st_mode):o}); refused")


def check_strict_modes(path: Path, st: os.stat_result, owner: int) -> None:
    """DataError unless only root or `owner` can change the open file `st` at `path`."""
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path}: not a regular file")
    if st.st_nlink != 1:
        raise DataError(f"{path}: has {st.st_nlink} hard links (expected 1: another name could change it); refused")
    if not _trusted(st, owner):
        raise DataError(f"{path}: owned by uid {st.st_uid}, not root or the store's owner (uid {owner}); refused")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise DataError(f"{path}: writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
                        "refused (chmod go-w)")
    _check_dirs(path, owner)


def open_image(path: Path, fmt: str, owner: int | None) -> OpenImage:
    """The file at `path` opened once, checked (StrictModes when `owner` is given) and its header
    checked for `fmt` (catalogue.qcow2); DataError (65) naming the file otherwise."""
    real = Path(os.path.realpath(path.parent)) / path.name  # the directories checked are the real ones
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if owner is not None:
            check_strict_modes(real, st, owner)
        elif not stat.S_ISREG(st.st_mode):
            raise DataError(f"{path}: not a regular file")
        size = check_image_header(fd, fmt, str(path))
        return OpenImage(real, fd, fmt, size)
    except BaseException:
        os.close(fd)
        raise


def copy_from(image: OpenImage, dest: Path) -> Path:
    """A private copy of the open file's bytes (read from the descriptor, not the path): for QEMU's
    -kernel/-initrd, which open a file name themselves and take no /dev/fdset."""
    with open(dest, "xb") as out:
        offset, size = 0, os.fstat(image.fd).st_size
        while offset < size:
            sent = os.sendfile(out.fileno(), image.fd, offset, size - offset)
            if sent == 0:
                raise DataError(f"{image.path}: shrank while being copied")
            offset += sent
    return dest


def suffix_format(path: Path) -> str:
    """Insecure mode only (no signed entry to say it): the format from the file's name, never from
    its content, so a raw image that looks like qcow2 cannot name a backing file."""
    return "raw" if path.suffix in (".raw", ".img") else "qcow2"
