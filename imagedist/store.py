"""What is imgdist's own in the store (`cluster.store` owns the layout): the image key that names
an image's files, and the lock that lets one puller at a time write to a store."""
from __future__ import annotations

import contextlib
from typing import Iterator

from cluster.files import LockBusy, lock_holder as _lock_holder, locked
from cluster.store import Store


def image_key(name: str, version: str) -> str:
    return f"{name}-{version}"


class Busy(LockBusy):
    """Another imgdist pass holds the store."""


@contextlib.contextmanager
def store_lock(store: Store, wait: bool) -> Iterator[None]:
    """One puller per store: two would write the same partial file."""
    path = store.runtime.imgdist_lock
    with locked(path, wait=wait, record_pid=True, error=Busy,
                busy=f"{path}: another imgdist (sync or daemon) is running on this store"):
        yield


def lock_holder(store: Store) -> int | None:
    """The pid of the imgdist holding the store lock, or None."""
    return _lock_holder(store.runtime.imgdist_lock)
