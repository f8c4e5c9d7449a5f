"""The image store on a hypervisor and where imgdist keeps its files in it.

```
images/base/NAME-VERSION.qcow2      verified, read-only (0444), installed by rename only
images/partial/NAME-VERSION.qcow2   downloads in progress: never booted from
images/torrents/NAME-VERSION.torrent, .resume   metainfo (for seeding) and resume data
state/imgdist.json                  enabled/disabled (persisted)
state/imgdist-status.json           what the running sync/daemon is doing (for --list)
state/imgdist.lock                  held by a sync pass or the daemon
```
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cluster.errors import TempFailure
from cluster.spec import ClusterSpec


@dataclass(frozen=True)
class Store:
    root: Path

    @classmethod
    def of(cls, spec: ClusterSpec) -> "Store":
        return cls(spec.store_path)

    @property
    def base(self) -> Path:
        return self.root / "images" / "base"

    @property
    def partial(self) -> Path:
        return self.root / "images" / "partial"

    @property
    def torrents(self) -> Path:
        return self.root / "images" / "torrents"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def jobs(self) -> Path:
        return self.state / "jobs"

    @property
    def enabled_file(self) -> Path:
        return self.state / "imgdist.json"

    @property
    def status_file(self) -> Path:
        return self.state / "imgdist-status.json"

    @property
    def lock_file(self) -> Path:
        return self.state / "imgdist.lock"

    def ensure(self) -> None:
        for d in (self.base, self.partial, self.torrents, self.state):
            d.mkdir(parents=True, exist_ok=True)

    def torrent_file(self, key: str) -> Path:
        return self.torrents / f"{key}.torrent"

    def resume_file(self, key: str) -> Path:
        return self.torrents / f"{key}.resume"


def image_key(name: str, version: str) -> str:
    return f"{name}-{version}"


class Busy(TempFailure):
    """Another imgdist pass holds the store."""


@contextlib.contextmanager
def store_lock(store: Store, wait: bool) -> Iterator[None]:
    """One puller per store: two would write the same partial file."""
    store.state.mkdir(parents=True, exist_ok=True)
    fd = os.open(store.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Busy(f"{store.lock_file}: another imgdist (sync or daemon) is running on this store") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def lock_holder(store: Store) -> int | None:
    """The pid of the imgdist holding the store lock, or None."""
    try:
        fd = os.open(store.lock_file, os.O_RDONLY)
    except FileNotFoundError:
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
