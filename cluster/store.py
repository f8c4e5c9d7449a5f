"""The store: every file salvus-jobs keeps on a hypervisor, under one root (the spec's `store`,
default `/var/lib/salvus`). This docstring is the layout; nothing outside this module joins a path
under the store, so moving a file is a change to this module and a migration step below.

```
layout.json                         the layout version of this store (see `LAYOUT_VERSION`)
images/base/NAME-VERSION.FMT        verified, read-only (0444) base images, installed by rename only
images/partial/NAME-VERSION.FMT     imgdist downloads in progress: never booted from
images/torrents/KEY.torrent|.resume imgdist metainfo (for seeding) and resume data
persistent/SERVICE_ID/DISK.qcow2    disks that outlive jobs (never deleted by salvus-jobs)
logs/                               job stdout/stderr (unless scheduler.log_dir says otherwise)
logs/console/SERVICE_ID.log         each VM's serial console; .log.1 its older part past the cap

trust/ (what this host believes; only `catalogue accept`, `approve` and imgdist write it):
trust/catalogue/                    the accepted signed index: index-V-SHA.yaml, .sig, .json (parsed),
                                    accepted.json (the pointer whose rename commits), .lock
trust/approvals.yaml, .approvals.lock  the site's approvals and the bytes each one pins
trust/hash-cache.json               sha256 of base images per file stamp

state/ (runtime: what is running here; job users write it; safe to lose when nothing runs):
state/jobs/SERVICE_ID.json          a running wrapper's status (`cluster.jobstatus`)
state/local-jobs/JOB_ID.*           the local executor's job records
state/submitted/BACKEND/cancelled/  DRMAA's cancel marks (the ledger itself is registry rows now;
                                    an older version's JOB_ID.json and pending/ files are moved in)
state/scripts/                      rendered job scripts (PBS)
state/desired.json                  an older version's desired counts: moved into the registry
state/registry.sqlite               the SQLite registry (unless registry.sqlite names a file)
state/imgdist.json, imgdist-status.json, imgdist.lock   imgdist's toggle, progress and lock
```

The store's owner is the owner of its root. `trust/` (and the root above it) must be owned by that
user (or root) and writable by nobody else, like sshd's StrictModes: `Store.checked_trust()`
refuses it otherwise with one line, and every reader of trust state goes through it. `state/`
may be shared with job users: nothing a trust decision rests on lives there.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cluster.errors import DataError, SpecError
from cluster.files import check_owned, locked, read_limited, write_atomic

log = logging.getLogger(__name__)

DEFAULT_STORE = "/var/lib/salvus"
# Bumped by every change to the layout above, with a step in MIGRATIONS that moves the files.
LAYOUT_VERSION = 2


def image_file_name(name: str, version: str, fmt: str = "qcow2") -> str:
    return f"{name}-{version}.{fmt}"


@dataclass(frozen=True)
class TrustPaths:
    """What the host trusts: the accepted index (the rollback floor), approvals, the hash cache.
    Never reset by a migration."""

    dir: Path
    owners: frozenset[int] = frozenset()  # who may write it (set by `Store.checked_trust`)

    @property
    def catalogue_dir(self) -> Path:
        return self.dir / "catalogue"

    @property
    def catalogue_lock(self) -> Path:
        return self.catalogue_dir / ".lock"

    @property
    def approvals(self) -> Path:
        return self.dir / "approvals.yaml"

    @property
    def approvals_lock(self) -> Path:
        return self.dir / ".approvals.lock"

    @property
    def hash_cache(self) -> Path:
        return self.dir / "hash-cache.json"


@dataclass(frozen=True)
class RuntimePaths:
    """What runs on this host: job status, executor records, ledgers, locks, the local registry."""

    dir: Path

    @property
    def jobs_dir(self) -> Path:
        return self.dir / "jobs"

    def job_status(self, service_id: str) -> Path:
        return self.jobs_dir / f"{service_id}.json"

    @property
    def local_jobs_dir(self) -> Path:
        return self.dir / "local-jobs"

    def submitted_dir(self, backend: str) -> Path:
        return self.dir / "submitted" / backend

    def pending_dir(self, backend: str) -> Path:
        """Submissions recorded before the scheduler heard of them, by their token."""
        return self.submitted_dir(backend) / "pending"

    @property
    def scripts_dir(self) -> Path:
        return self.dir / "scripts"

    @property
    def desired(self) -> Path:
        """An older version's desired counts (moved into the registry on first read)."""
        return self.dir / "desired.json"

    @property
    def registry_sqlite(self) -> Path:
        return self.dir / "registry.sqlite"

    @property
    def imgdist_enabled(self) -> Path:
        return self.dir / "imgdist.json"

    @property
    def imgdist_status(self) -> Path:
        return self.dir / "imgdist-status.json"

    @property
    def imgdist_lock(self) -> Path:
        return self.dir / "imgdist.lock"


@dataclass(frozen=True)
class Store:
    root: Path

    @classmethod
    def of(cls, spec) -> "Store":
        """The store a spec names (no I/O)."""
        return cls(spec.store_path)

    # --- images -----------------------------------------------------------------------------
    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def base(self) -> Path:
        return self.images_dir / "base"

    @property
    def partial(self) -> Path:
        return self.images_dir / "partial"

    @property
    def torrents(self) -> Path:
        return self.images_dir / "torrents"

    def torrent_file(self, key: str) -> Path:
        return self.torrents / f"{key}.torrent"

    def resume_file(self, key: str) -> Path:
        return self.torrents / f"{key}.resume"

    def base_image(self, file_name: str) -> Path:
        """`images/base/FILE`, refusing a name that resolves anywhere else (a symlink, '..')."""
        base = self.base.resolve()
        path = (base / file_name).resolve()
        if path.parent != base:
            raise ValueError(f"image file {file_name!r}: resolves outside the image store")
        return path

    # --- disks and logs ---------------------------------------------------------------------
    def persistent_disk(self, service_id: str, disk_name: str) -> Path:
        return self.root / "persistent" / service_id / f"{disk_name}.qcow2"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def console_logs(self) -> Path:
        return self.logs / "console"

    def console_log(self, service_id: str) -> Path:
        return self.console_logs / f"{service_id}.log"

    # --- state ------------------------------------------------------------------------------
    @property
    def state(self) -> Path:
        """The runtime directory (job users may write it)."""
        return self.root / "state"

    @property
    def trust(self) -> TrustPaths:
        """Where trust state lives (no I/O, no checks: readers use `checked_trust`)."""
        return TrustPaths(self.root / "trust")

    @property
    def runtime(self) -> RuntimePaths:
        return RuntimePaths(self.state)

    @property
    def layout_file(self) -> Path:
        return self.root / "layout.json"

    @property
    def _legacy_layout_file(self) -> Path:
        return self.state / "layout.json"  # layout 1 kept it with the runtime state

    def owners(self) -> frozenset[int]:
        """Who may write trust state: the owner of the store's root, and root."""
        try:
            return frozenset({os.stat(self.root).st_uid, 0})
        except FileNotFoundError:
            return frozenset({os.geteuid(), 0})  # no store yet, so no trust state to refuse
        except OSError as e:
            raise DataError(f"{self.root}: cannot stat the store: {e.strerror or e}") from None

    def checked_trust(self, create: bool = False) -> TrustPaths:
        """The trust paths once the store's root, `trust/` and `trust/catalogue/` are owned by the
        store's owner (or root) and writable by no one else; DataError (one line) otherwise. With
        `create` (the writers) the directories are made first, 0755 whatever the umask."""
        trust = self.trust
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
            _make_dir(trust.dir)
            _make_dir(trust.catalogue_dir)
        owners = self.owners()
        for d, sticky_ok in ((self.root, True), (trust.dir, False), (trust.catalogue_dir, False)):
            try:
                st = os.lstat(d)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise DataError(f"{d}: cannot stat: {e.strerror or e}") from None
            check_owned(d, st, owners, sticky_ok=sticky_ok)
        return TrustPaths(trust.dir, owners)

    def ensure_images(self) -> None:
        for d in (self.base, self.partial, self.torrents, self.state):
            d.mkdir(parents=True, exist_ok=True)

    # --- layout version ---------------------------------------------------------------------
    def layout_version(self) -> int:
        """The layout this store was written in: 0 for a store from before versioning."""
        path = self.layout_file if self.layout_file.exists() else self._legacy_layout_file
        if not path.exists():
            return 0
        try:
            version = json.loads(read_limited(path, 4096))["layout"]
            if not isinstance(version, int) or isinstance(version, bool) or version < 0:
                raise ValueError
            return version
        except (ValueError, KeyError, TypeError):
            raise SpecError(f"{path}: damaged; expected {{\"layout\": N}}") from None

    def open(self) -> "Store":
        """Checks the layout and migrates an older store in place; refuses a newer one (written by
        a newer salvus-jobs, whose files this version would misread). Returns self."""
        if not self.layout_file.exists() and not self._legacy_layout_file.exists():
            if not self.root.exists() or not any(self.root.iterdir()):
                self._stamp(LAYOUT_VERSION)
                return self
        version = self.layout_version()
        if version > LAYOUT_VERSION:
            raise SpecError(f"{self.root}: store layout {version} is newer than this salvus-jobs "
                            f"understands ({LAYOUT_VERSION}); upgrade salvus-jobs on this host")
        if version == LAYOUT_VERSION:
            return self
        try:
            # The lock sits in the root, which job users cannot write; two processes opening an
            # old store at once migrate it once.
            with locked(self.root / ".layout.lock"):
                for step in range(self.layout_version() + 1, LAYOUT_VERSION + 1):
                    log.info("store %s: migrating layout %d -> %d", self.root, step - 1, step)
                    MIGRATIONS[step](self)
                    self._stamp(step)
        except OSError as e:
            raise SpecError(f"{self.root}: cannot migrate the store to layout {LAYOUT_VERSION}: "
                            f"{e.strerror or e}; run any salvus_jobs or imgdist command once as the "
                            "store's owner") from None
        return self

    def _stamp(self, version: int) -> None:
        write_atomic(self.layout_file, (json.dumps({"layout": version}) + "\n").encode())


def _make_dir(path: Path) -> None:
    """A trust directory, 0755 whatever the umask (a umask of 002 would make it refused)."""
    try:
        path.mkdir(mode=0o755)
    except FileExistsError:
        return
    os.chmod(path, 0o755)


def _migrate_to_1(store: Store) -> None:
    """Layout 1 is the layout of stores written before the version file existed; nothing moves.
    A step that moves files renames them (never copies and deletes) and leaves trust state as it
    is: the accepted index is the rollback floor, and resetting it would let an old index back in."""


def _migrate_to_2(store: Store) -> None:
    """Trust state leaves `state/` (which job users write) for its own `trust/` directory: the
    accepted index, the approvals and their lock are renamed, never reset. A hash cache some other
    user wrote (the job user's wrapper did, in layout 1) vouches for nothing and is dropped; it
    only costs a re-hash. A destination that exists already is never overwritten."""
    old = TrustPaths(store.state)
    _make_dir(store.trust.dir)
    new = store.checked_trust()
    moves = [(old.catalogue_dir, new.catalogue_dir), (old.approvals, new.approvals),
             (old.approvals_lock, new.approvals_lock), (old.hash_cache, new.hash_cache)]
    for src, dst in moves:
        if src == old.hash_cache and os.path.lexists(src) and os.lstat(src).st_uid not in new.owners:
            log.warning("store %s: dropping %s (written by uid %d, not the store's owner)",
                        store.root, src, os.lstat(src).st_uid)
            src.unlink()
            continue
        if os.path.lexists(src) and not os.path.lexists(dst):
            os.rename(src, dst)
            log.info("store %s: moved %s -> %s", store.root, src, dst)
    _make_dir(new.catalogue_dir)
    store._legacy_layout_file.unlink(missing_ok=True)


# step N takes a store at layout N-1 to layout N
MIGRATIONS: dict[int, Callable[[Store], None]] = {1: _migrate_to_1, 2: _migrate_to_2}
