"""The registry's versioning rule, for every backend: a registry an older version wrote (made here
from today's schema less a column, unstamped) is read and written, the missing column added in
place; one stamped by a newer version is refused with one line."""
from __future__ import annotations

import sqlite3

import pytest

from cluster.errors import RegistryMisconfigured
from cluster.registry import Service, open_registry
from cluster.registry.base import SCHEMA_VERSION
from cluster.registry import cassandra as cassandra_backend
from cluster.registry import sqlite as sqlite_backend

OLD_ROW = ("sage", "sage-old", "127.0.0.1", 6000, "hv1", "local", "7", 1000.0, 1000.0)
OLD_COLUMNS = ("role", "service_id", "host", "port", "hypervisor", "scheduler", "job_id", "started",
               "last_heartbeat")  # today's columns less `image`, `host_keys` (schema 2) and `ssh_port` (3), as a
# version before all three would have


def _old_sqlite(spec, newer: bool) -> None:
    db = sqlite3.connect(spec.sqlite_path)
    schema = sqlite_backend._SCHEMA.replace("    image          TEXT NOT NULL,\n", "")
    schema = schema.replace("    host_keys      TEXT NOT NULL DEFAULT '',\n", "")
    schema = schema.replace("    ssh_port       INTEGER NOT NULL DEFAULT 0,\n", "")
    assert "image" not in schema and "host_keys" not in schema and "ssh_port" not in schema
    db.executescript(schema)
    db.execute(f"INSERT INTO services ({', '.join(OLD_COLUMNS)}, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
               (*OLD_ROW, 4e9))
    if newer:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()


def _old_cassandra(spec, newer: bool) -> None:
    from cassandra.auth import PlainTextAuthProvider
    from cassandra.cluster import Cluster

    c = spec.registry.cassandra
    cluster = Cluster(list(c.contact_points), port=c.port, protocol_version=5,
                      auth_provider=PlainTextAuthProvider(c.username, open(c.password_file).read().strip()))
    ks = c.keyspace
    try:
        session = cluster.connect()
        session.execute(f"CREATE KEYSPACE {ks} WITH replication = "
                        "{'class': 'SimpleStrategy', 'replication_factor': 1}", timeout=60)
        for table in (cassandra_backend.BY_ROLE, cassandra_backend.BY_ID):
            ddl = cassandra_backend._table_ddl(ks, table).replace(", image text", "").replace(", host_keys text", "")
            ddl = ddl.replace(", ssh_port int", "")
            ddl = ddl[:ddl.index(" AND comment")]  # tables from before versioning carry none
            assert " image " not in ddl and "host_keys" not in ddl and "ssh_port" not in ddl
            session.execute(ddl, timeout=60)
            session.execute(f"INSERT INTO {ks}.{table} ({', '.join(OLD_COLUMNS)}) VALUES "
                            f"({', '.join(['%s'] * len(OLD_COLUMNS))}) USING TTL 600", OLD_ROW, timeout=60)
        if newer:
            session.execute(f"ALTER TABLE {ks}.{cassandra_backend.BY_ID} WITH comment = "
                            f"'{cassandra_backend.SCHEMA_COMMENT.format(SCHEMA_VERSION + 1)}'", timeout=60)
    finally:
        cluster.shutdown()


KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOr5a3bPpvs0sh8Q7dS8f3bA6Z+vKkIY3m5x0V8xY0cC"
MAKE_OLD = {"sqlite": _old_sqlite, "cassandra": _old_cassandra}


def test_registry_written_by_an_older_version_is_read_and_written(registry_spec_factory):
    spec = registry_spec_factory()
    MAKE_OLD[registry_spec_factory.backend](spec, newer=False)
    with open_registry(spec) as reg:
        old = reg.get("sage-old")
        assert old is not None and (old.host, old.port, old.job_id) == ("127.0.0.1", 6000, "7")
        assert old.image == ""  # the column added in place reads as the field's default
        assert old.host_keys == "" and old.ssh_port == 0  # schema 2's and 3's columns likewise
        reg.register(Service("sage", "sage-new", "127.0.0.1", 6001, image="demo@1", host_keys=KEY, ssh_port=2222))
        assert reg.heartbeat("sage-old") is True
        assert {s.service_id: s.image for s in reg.lookup("sage")} == {"sage-old": "", "sage-new": "demo@1"}
        # Schema 4's tables, added in place: shared state and leases work on the old registry.
        reg.write_state("desired", "sage", "2")
        assert reg.acquire_lease("controller", "a", 30) == 1
    with open_registry(spec) as reg:  # stamped now: opens again without changes
        assert reg.get("sage-new").image == "demo@1"
        assert reg.get("sage-new").host_keys == KEY and reg.get("sage-new").ssh_port == 2222
        assert reg.read_state("desired") == {"sage": "2"} and reg.lease("controller").holder == "a"


def test_registry_written_by_a_newer_version_is_refused(registry_spec_factory):
    spec = registry_spec_factory()
    MAKE_OLD[registry_spec_factory.backend](spec, newer=True)
    with pytest.raises(RegistryMisconfigured, match=f"schema version {SCHEMA_VERSION + 1}.*newer salvus-jobs") as e:
        open_registry(spec)
    assert "\n" not in str(e.value)
