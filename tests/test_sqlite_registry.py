"""SQLite-specific guarantees beyond the shared suite."""
from __future__ import annotations

import sqlite3

from cluster.registry import Service
from cluster.registry.sqlite import SqliteRegistry


def test_sqlite_uses_wal_and_passes_integrity_check(tmp_path):
    path = tmp_path / "state" / "registry.sqlite"
    with SqliteRegistry(path, ttl=30) as reg:
        reg.register(Service(role="sage", service_id="x", host="h", port=1))
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT service_id FROM services").fetchall() == [("x",)]
