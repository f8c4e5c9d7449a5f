"""The Cassandra registry against real Cassandra nodes: bad input at start-up gives one clear line
(exit 78 for what retrying cannot fix, 75 for what may pass), failures after start-up surface as RegistryUnavailable, and a 3-node RF=3 ring keeps answering with
a node stopped. (The backend-independent behaviour is tests/test_registry.py's [cassandra] params.)"""
from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import Cluster

from cluster.errors import EXIT_CONFIG, EXIT_TEMPFAIL, RegistryMisconfigured, RegistryUnavailable, SpecError
from cluster.registry import Service, open_registry
from cluster.registry.cassandra import table_id
from cluster.spec import load_spec
from jobwrappers.heartbeat import Heartbeater
from tests.fixtures.cassandra import (CassandraNode, cassandra_spec, free_loopback_addresses, free_port,
                                      start_node, stop_node)

pytestmark = pytest.mark.cassandra


def svc(sid: str, role: str = "sage") -> Service:
    return Service(role=role, service_id=sid, host="10.0.0.5", port=6000, hypervisor="hv1",
                   scheduler="slurm", job_id="7", image="demo@1")


def open_fails(spec, kind: type = RegistryUnavailable) -> str:
    """The one-line message opening `spec` fails with: RegistryUnavailable (75) for what may pass,
    RegistryMisconfigured (78) for what the cluster refuses whatever the time."""
    with pytest.raises(kind) as err:
        open_registry(spec)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def write_spec_file(tmp_path: Path, spec_text: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(spec_text)
    return path


def node_spec(node: CassandraNode, tmp_path: Path, keyspace: str, **kw):
    return cassandra_spec(tmp_path, [node.address], keyspace, username=node.username,
                          password_file=node.password_file, **kw)


def test_unreachable_contact_point_is_one_line_and_exit_75(tmp_path, cli):
    port = free_port()  # nothing listens there
    spec = cassandra_spec(tmp_path, ["127.0.0.1"], "salvus", extra=f", port: {port}, connect_timeout: 2")
    message = open_fails(spec)
    assert f"127.0.0.1:{port}" in message and "no node reachable" in message
    assert "refused" in message.lower()
    spec_file = write_spec_file(tmp_path, (
        f"registry: {{cassandra: {{contact_points: [127.0.0.1], port: {port}, connect_timeout: 2}}}}\n"
        "roles: {sage: {image: demo@1, port: 6000}}\n"))
    done = cli("services", "--spec", str(spec_file))
    assert done.returncode == EXIT_TEMPFAIL
    assert len(done.stderr.strip().splitlines()) == 1 and "no node reachable" in done.stderr


def test_unresolvable_contact_point_is_one_line(tmp_path):
    message = open_fails(cassandra_spec(tmp_path, ["no-such-node.invalid"], "salvus"))
    assert "no-such-node.invalid" in message


def test_wrong_password_is_one_line_naming_authentication(cassandra_node, tmp_path, cli):
    bad = tmp_path / "bad-password"
    bad.write_text("not-the-password\n")
    bad.chmod(0o600)
    spec = cassandra_spec(tmp_path, [cassandra_node.address], "authcheck", username="cassandra", password_file=bad)
    message = open_fails(spec, RegistryMisconfigured)
    assert "authentication failed" in message and cassandra_node.address in message
    spec_file = write_spec_file(tmp_path, (
        f"registry: {{cassandra: {{contact_points: [{cassandra_node.address}], username: cassandra, "
        f"password_file: {bad}}}}}\nroles: {{sage: {{image: demo@1, port: 6000}}}}\n"))
    done = cli("services", "--spec", str(spec_file))
    assert done.returncode == EXIT_CONFIG  # a scheduler must not retry a wrong password forever
    assert len(done.stderr.strip().splitlines()) == 1 and "authentication failed" in done.stderr


def test_services_command_lists_what_the_cassandra_registry_holds(cassandra_node, tmp_path, cli):
    spec_file = write_spec_file(tmp_path, (
        f"registry: {{cassandra: {{contact_points: [{cassandra_node.address}], keyspace: clilist, "
        f"username: cassandra, password_file: {cassandra_node.password_file}}}}}\n"
        "roles: {sage: {image: demo@1, port: 6000}, hub: {image: demo@1, port: 8080}}\n"))
    with open_registry(load_spec(spec_file)) as reg:
        reg.register(svc("sage-cli"))
        reg.register(svc("hub-cli", role="hub"))
    done = cli("services", "sage", "--json", "--spec", str(spec_file))
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert [(s["service_id"], s["host"], s["port"], s["image"]) for s in listed] == [
        ("sage-cli", "10.0.0.5", 6000, "demo@1")]


def test_missing_credentials_are_a_spec_error(cassandra_node, tmp_path):
    with pytest.raises(SpecError, match="password_file: cannot read"):
        open_registry(cassandra_spec(tmp_path, [cassandra_node.address], "nocreds", username="cassandra",
                                     password_file=tmp_path / "absent"))
    # Without credentials the node (PasswordAuthenticator) refuses the connection.
    assert "authentication" in open_fails(cassandra_spec(tmp_path, [cassandra_node.address], "nocreds"),
                                         RegistryMisconfigured).lower()


def test_keyspace_of_another_application_is_refused(cassandra_node, tmp_path):
    cluster = Cluster([cassandra_node.address], protocol_version=5,
                      auth_provider=PlainTextAuthProvider("cassandra", "cassandra"))
    try:
        session = cluster.connect()
        session.execute("CREATE KEYSPACE otherapp WITH replication = "
                        "{'class': 'SimpleStrategy', 'replication_factor': 1}", timeout=60)
        session.execute("CREATE TABLE otherapp.services_by_role (role text, service_id text, port text, "
                        "PRIMARY KEY (role, service_id))", timeout=60)
    finally:
        cluster.shutdown()
    message = open_fails(node_spec(cassandra_node, tmp_path, "otherapp"), RegistryMisconfigured)
    assert "services_by_role exists with another schema" in message and "port" in message


def test_keyspace_that_cannot_meet_the_consistency_level_is_refused(cassandra_node, tmp_path):
    rf3 = ", replication: {class: SimpleStrategy, replication_factor: 3}"
    message = open_fails(node_spec(cassandra_node, tmp_path, "toowide", extra=rf3), RegistryMisconfigured)
    assert "replication factor 3" in message and "LOCAL_QUORUM needs 2" in message
    # The same keyspace is fine at a consistency level one node can give.
    with open_registry(node_spec(cassandra_node, tmp_path, "toowide", extra=rf3 + ", consistency: ONE")) as reg:
        reg.register(svc("s1"))
        assert [s.service_id for s in reg.lookup("sage")] == ["s1"]
    unknown_dc = ", replication: {class: NetworkTopologyStrategy, dc9: 3}"
    message = open_fails(node_spec(cassandra_node, tmp_path, "elsewhere", extra=unknown_dc), RegistryMisconfigured)
    assert "dc9" in message
    message = open_fails(node_spec(cassandra_node, tmp_path, "elsewhere", extra=", local_dc: dc9"),
                         RegistryMisconfigured)
    assert "local_dc 'dc9' is not a datacenter of this cluster (it has: datacenter1)" in message


def test_bad_keyspace_or_consistency_names_are_spec_errors(cassandra_node, tmp_path):
    with pytest.raises(SpecError, match="keyspace: 'system'"):
        open_registry(node_spec(cassandra_node, tmp_path, "system"))
    with pytest.raises(SpecError, match="registry.cassandra.consistency: expected a consistency level"):
        node_spec(cassandra_node, tmp_path, "fine", extra=", consistency: MOSTLY")
    assert SpecError.exit_code == EXIT_CONFIG


def test_heartbeat_rewrites_the_whole_row_and_its_ttl(cassandra_node, tmp_path):
    """TTL is per cell: after a heartbeat every column must carry the fresh TTL, not just one."""
    spec = node_spec(cassandra_node, tmp_path, "ttlcheck", ttl=60)
    with open_registry(spec) as reg:
        reg.register(svc("s1"))
        time.sleep(2.2)
        assert reg.heartbeat("s1")
        for table, where in (("services_by_role", "role = 'sage' AND service_id = 's1'"),
                             ("services_by_id", "service_id = 's1'")):
            row = reg._session.execute(f"SELECT TTL(host), TTL(port), TTL(image), TTL(started), "
                                       f"TTL(last_heartbeat) FROM ttlcheck.{table} WHERE {where}").one()
            assert all(58 <= t <= 60 for t in row), (table, row)


def test_heartbeats_leave_no_tombstones_for_lookups_to_skip(cassandra_node, tmp_path):
    """Heartbeats overwrite one row per service in place; only the services that went away leave
    a tombstone each. The server's own read trace counts what a lookup had to read."""
    with open_registry(node_spec(cassandra_node, tmp_path, "tombs", ttl=60)) as reg:
        for i in range(10):
            reg.register(svc(f"t{i}"))
        for _ in range(20):
            assert all(reg.heartbeat(f"t{i}") for i in range(10))
        reg.deregister("t0")
        reg.deregister("t1")
        result = reg._session.execute(reg._stmt["select_by_role"], ("sage",), trace=True)
        assert len(list(result)) == 8
        events = [e.description for e in result.get_query_trace(max_wait_sec=30).events]
    counts = [tuple(map(int, m.groups())) for m in
              (re.search(r"Read (\d+) live rows and (\d+) tombstone cells", d) for d in events) if m]
    assert counts, events
    live, tombstones = max(counts)  # the trace may also hold the authorizer's own small reads
    assert live == 8 and tombstones <= 2, counts


def test_every_client_creates_a_table_under_the_same_id(cassandra_node, tmp_path):
    """Wrappers creating a new keyspace at once must not make two versions of one table (the loser's
    clients then fail with "Unknown CF"): each table's id is derived from its name, not random."""
    with open_registry(node_spec(cassandra_node, tmp_path, "sameid")) as reg:
        rows = reg._session.execute("SELECT table_name, id FROM system_schema.tables "
                                    "WHERE keyspace_name = 'sameid'")
        ids = dict(rows)  # the registry reads tuples
    assert set(ids) == {"services_by_role", "services_by_id", "state", "leases"}
    assert all(ids[t] == table_id("sameid", t) for t in ids), ids
    assert len(set(ids.values())) == 4


def test_reregistering_under_another_role_moves_the_row(cassandra_node, tmp_path):
    with open_registry(node_spec(cassandra_node, tmp_path, "moves")) as reg:
        reg.register(svc("x1", role="sage"))
        reg.register(svc("x1", role="hub"))
        assert reg.lookup("sage") == [] and [s.service_id for s in reg.lookup("hub")] == ["x1"]
        assert reg.get("x1").role == "hub"


@pytest.mark.slow  # three Cassandra nodes: a multi-host ring
def test_three_nodes_rf3_keep_answering_with_one_node_stopped(tmp_path):
    """Three nodes on consecutive loopback addresses, replication factor 3, LOCAL_QUORUM: with any one
    node stopped (here the first contact point) lookups, heartbeats and registrations go on; with
    two stopped every call raises RegistryUnavailable and a wrapper's heartbeat fails softly."""
    addresses = free_loopback_addresses(3, first=1)
    dirs = [tmp_path / f"node{i}" for i in range(3)]
    tokens = [i * ((1 << 64) // 3) - (1 << 63) for i in range(3)]
    try:
        # The seed alone first (a node whose only seed is itself starts without waiting for
        # peers), then the other two at once, both finding the ring through it.
        start_node(dirs[0], addresses[0], cluster_name="salvus-ring", initial_token=tokens[0])
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda i: start_node(dirs[i], addresses[i], seeds=addresses[0],
                                               cluster_name="salvus-ring", initial_token=tokens[i]), (1, 2)))
        spec = cassandra_spec(tmp_path, addresses, "ring", ttl=120,
                              extra=", replication: {class: SimpleStrategy, replication_factor: 3}")
        with open_registry(spec) as reg:
            ids = {f"sage-{i}" for i in range(30)}
            for sid in sorted(ids):
                reg.register(svc(sid))
            beater = Heartbeater(reg, svc("hub-0", role="hub"), interval=1, ttl=120)
            beater.start()

            stop_node(dirs[0])
            assert {s.service_id for s in reg.lookup("sage")} == ids
            assert all(reg.heartbeat(sid) for sid in ids)
            reg.register(svc("sage-late"))
            assert reg.get("sage-late") is not None and reg.get("hub-0") is not None
            with open_registry(spec) as fresh:  # a new client whose first contact point is down
                assert len(fresh.lookup("sage")) == 31

            stop_node(dirs[1])
            with pytest.raises(RegistryUnavailable) as err:
                reg.lookup("sage")
            assert "\n" not in str(err.value) and "LOCAL_QUORUM" in str(err.value)
            with pytest.raises(RegistryUnavailable):
                reg.heartbeat("sage-1")
            beater.next_due = 0
            beater.beat_if_due()  # logged and scheduled again, never raised: the VM keeps running
            assert beater.failures == 1
    finally:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(stop_node, dirs))
