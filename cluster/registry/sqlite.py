"""SQLite registry backend: one machine, many wrapper processes writing at once.

WAL lets readers run beside the one writer; a busy timeout queues writers instead of failing; each
operation is one short transaction (BEGIN IMMEDIATE takes the write lock up front so two writers
never deadlock upgrading a read lock). synchronous=NORMAL in WAL mode is durable against a crashed
or SIGKILLed process (only a power loss can drop the last commits), which is the failure the job
wrappers have.

The database is created 0600 (`cluster.files.PRIVATE_MODE`); SQLite gives its -wal and -shm files the database's
mode, so all three are the owner's only. (A reader needs write access to -shm anyway, so group read
would buy nothing.)
"""
from __future__ import annotations

import dataclasses
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cluster.errors import RegistryMisconfigured, RegistryUnavailable, SalvusError
from cluster.files import PRIVATE_MODE
from cluster.registry.base import SCHEMA_VERSION, LeaseInfo, Registry, Service, column_default, valid_services

_COLUMNS = ("role", "service_id", "host", "port", "hypervisor", "scheduler", "job_id", "image",
            "started", "last_heartbeat", "host_keys", "ssh_port")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS services (
    service_id     TEXT PRIMARY KEY,
    role           TEXT NOT NULL,
    host           TEXT NOT NULL,
    port           INTEGER NOT NULL,
    hypervisor     TEXT NOT NULL,
    scheduler      TEXT NOT NULL,
    job_id         TEXT NOT NULL,
    image          TEXT NOT NULL,
    started        REAL NOT NULL,
    last_heartbeat REAL NOT NULL,
    host_keys      TEXT NOT NULL DEFAULT '',
    ssh_port       INTEGER NOT NULL DEFAULT 0,
    expires_at     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS services_role_expires ON services (role, expires_at);
CREATE INDEX IF NOT EXISTS services_expires ON services (expires_at);
CREATE TABLE IF NOT EXISTS state (
    kind  TEXT NOT NULL,
    key   TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE TABLE IF NOT EXISTS leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    token      INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
"""
_SQL_TYPES = {"str": "TEXT", "int": "INTEGER", "float": "REAL"}
# SQLite's primary result codes for a file that is no database, or a damaged one: no retry mends
# it, so it is a configuration error (78) rather than an outage (75).
_DAMAGED = frozenset({sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT})


def _create_private(path: Path) -> None:
    """Creates an empty database file with PRIVATE_MODE unless one is there (SQLite would create
    it 0644 less the umask)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE))
    except FileExistsError:
        pass


class SqliteRegistry(Registry):
    def __init__(self, path: Path | str, ttl: int = 30, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.ttl = ttl
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _create_private(self.path)
            self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            with self._write() as db:
                self._ensure_schema(db)
        except sqlite3.Error as e:
            raise self._failure(e) from None
        except OSError as e:
            raise RegistryUnavailable(f"registry {self.path}: {e}") from None

    def _failure(self, e: sqlite3.Error) -> SalvusError:
        if (getattr(e, "sqlite_errorcode", 0) & 0xFF) in _DAMAGED:
            return RegistryMisconfigured(
                f"registry {self.path}: {e}: not a registry or damaged; move it aside (its rows are soft "
                "state: running wrappers register again at their next heartbeat)")
        return RegistryUnavailable(f"registry {self.path}: {e}")

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """sqlite3 errors of one operation as the registry's own: damaged (78) or unavailable (75)."""
        try:
            yield
        except sqlite3.Error as e:
            raise self._failure(e) from None

    def _ensure_schema(self, db: sqlite3.Connection) -> None:
        """Creates the table, or brings one an older version wrote up to SCHEMA_VERSION in place."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RegistryMisconfigured(
                f"registry {self.path}: schema version {version} was written by a newer salvus-jobs "
                f"(this one knows {SCHEMA_VERSION}); upgrade salvus-jobs here")
        for stmt in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
            db.execute(stmt)
        have = {row[1] for row in db.execute("PRAGMA table_info(services)")}
        for f in dataclasses.fields(Service):
            if f.name not in have:
                default = column_default(f)
                db.execute(f"ALTER TABLE services ADD COLUMN {f.name} {_SQL_TYPES[str(f.type)]} NOT NULL "
                           f"DEFAULT {default!r}")
        if version < SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    def register(self, service: Service) -> None:
        now = time.time()
        service.last_heartbeat = now
        row = tuple(getattr(service, c) for c in _COLUMNS) + (now + self.ttl,)
        with self._errors(), self._write() as db:
            # Rows that expired long ago are removed by whoever writes next; no reaper process.
            db.execute("DELETE FROM services WHERE expires_at < ?", (now - self.ttl,))
            db.execute(f"INSERT OR REPLACE INTO services ({', '.join(_COLUMNS)}, expires_at) "
                       f"VALUES ({', '.join('?' * (len(_COLUMNS) + 1))})", row)

    def heartbeat(self, service_id: str, owner: Service | None = None) -> bool:
        now = time.time()
        # Compare-and-set in one UPDATE: the row is refreshed only while it is still the owner's.
        mine = " AND job_id = ? AND host = ? AND port = ?" if owner else ""
        with self._errors(), self._write() as db:
            cur = db.execute("UPDATE services SET last_heartbeat = ?, expires_at = ? "
                             "WHERE service_id = ? AND expires_at > ?" + mine,
                             (now, now + self.ttl, service_id, now,
                              *((owner.job_id, owner.host, owner.port) if owner else ())))
            return cur.rowcount == 1

    def deregister(self, service_id: str) -> None:
        with self._errors(), self._write() as db:
            db.execute("DELETE FROM services WHERE service_id = ?", (service_id,))

    def _select(self, where: str, args: tuple) -> list[Service]:
        with self._errors():
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM services WHERE {where}", args)
            # _COLUMNS is in Service's field order, so rows map positionally (cheaper for big lookups).
            return valid_services(Service.from_row(r) for r in rows)

    def lookup(self, role: str) -> list[Service]:
        return self._select("role = ? AND expires_at > ? ORDER BY started", (role, time.time()))

    def all(self) -> list[Service]:
        return self._select("expires_at > ? ORDER BY role, started", (time.time(),))

    def get(self, service_id: str) -> Service | None:
        found = self._select("service_id = ? AND expires_at > ?", (service_id, time.time()))
        return found[0] if found else None

    def read_state(self, kind: str) -> dict[str, str]:
        with self._errors():
            return dict(self._db.execute("SELECT key, value FROM state WHERE kind = ?", (kind,)))

    def write_state(self, kind: str, key: str, value: str | None) -> None:
        with self._errors(), self._write() as db:
            if value is None:
                db.execute("DELETE FROM state WHERE kind = ? AND key = ?", (kind, key))
            else:
                db.execute("INSERT OR REPLACE INTO state (kind, key, value) VALUES (?, ?, ?)", (kind, key, value))

    def acquire_lease(self, name: str, holder: str, ttl: int) -> int | None:
        now = time.time()
        with self._errors(), self._write() as db:
            row = db.execute("SELECT holder, token, expires_at FROM leases WHERE name = ?", (name,)).fetchone()
            if row is not None and row[2] > now and row[0] != holder:
                return None
            # The row outlives its expiry so the next token is greater than every one before.
            token = (row[1] if row is not None else 0) + 1
            db.execute("INSERT OR REPLACE INTO leases (name, holder, token, expires_at) VALUES (?, ?, ?, ?)",
                       (name, holder, token, now + ttl))
            return token

    def renew_lease(self, name: str, holder: str, token: int, ttl: int) -> bool:
        now = time.time()
        with self._errors(), self._write() as db:
            cur = db.execute("UPDATE leases SET expires_at = ? WHERE name = ? AND holder = ? AND token = ? "
                             "AND expires_at > ?", (now + ttl, name, holder, token, now))
            return cur.rowcount == 1

    def release_lease(self, name: str, holder: str, token: int) -> None:
        with self._errors(), self._write() as db:
            db.execute("UPDATE leases SET expires_at = 0 WHERE name = ? AND holder = ? AND token = ?",
                       (name, holder, token))

    def lease(self, name: str) -> LeaseInfo | None:
        now = time.time()
        with self._errors():
            row = self._db.execute("SELECT holder, token, expires_at FROM leases WHERE name = ? AND expires_at > ?",
                                   (name, now)).fetchone()
        return LeaseInfo(name, row[0], row[1], row[2] - now) if row else None

    def close(self) -> None:
        self._db.close()
