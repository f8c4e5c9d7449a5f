"""Registry benchmark: 10,000 services; lookup-by-role latency and heartbeat throughput.

Our SQLite backend (WAL, role index, one connection per process, one short transaction per
operation) next to the naive way (rollback journal, no index, a new connection per operation) in
the same run. Figures are printed, not asserted; the last line is `key=value` pairs.

With `--backend cassandra` the same figures for the Cassandra backend follow in the same table: a
temporary single node started with scripts/cassandra (or an existing cluster, `--cassandra HOST,..`),
next to the naive Cassandra client that opens a Cluster per request.

    .venv/bin/python benchmarks/registry_bench.py [--services 10000] [--seconds 3] [--backend cassandra]
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.registry import Service, open_registry  # noqa: E402
from cluster.spec import ClusterSpec, parse_spec  # noqa: E402

ROLES = {"sage": 0.8, "hub": 0.1, "cassandra": 0.1}
HEARTBEAT_PROCS = 8


def make_sqlite_spec(workdir: Path) -> ClusterSpec:
    text = (f"store: {workdir}/store\nregistry: {{sqlite: {workdir}/bench.sqlite, ttl: 600}}\n"
            "roles: {sage: {image: demo@1, port: 6000}, hub: {image: demo@1, port: 8080},"
            " cassandra: {image: demo@1, port: 9042}}\n")
    return parse_spec(text, workdir / "cluster.yaml")


def service_ids(n: int) -> list[tuple[str, str]]:
    rng = random.Random(7)
    roles = list(ROLES)
    weights = list(ROLES.values())
    return [(rng.choices(roles, weights)[0], f"svc-{i:05d}") for i in range(n)]


class NaiveSqliteRegistry:
    """What a first version would do: a connection per request, default journal, no role index."""

    def __init__(self, path: Path, ttl: int) -> None:
        self.path, self.ttl = path, ttl
        with self._conn() as db:
            db.execute("CREATE TABLE IF NOT EXISTS services (service_id TEXT, role TEXT, host TEXT,"
                       " port INTEGER, started REAL, last_heartbeat REAL, expires_at REAL)")

    def _conn(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)

    def register(self, s: Service) -> None:
        now = time.time()
        with self._conn() as db:
            db.execute("DELETE FROM services WHERE service_id = ?", (s.service_id,))
            db.execute("INSERT INTO services VALUES (?,?,?,?,?,?,?)",
                       (s.service_id, s.role, s.host, s.port, s.started, now, now + self.ttl))

    def heartbeat(self, sid: str) -> bool:
        now = time.time()
        with self._conn() as db:
            return db.execute("UPDATE services SET last_heartbeat=?, expires_at=? WHERE service_id=?",
                              (now, now + self.ttl, sid)).rowcount == 1

    def lookup(self, role: str) -> list:
        with self._conn() as db:
            rows = db.execute("SELECT role, service_id, host, port, started, last_heartbeat FROM services "
                              "WHERE role=? AND expires_at>?", (role, time.time())).fetchall()
        return [Service(role=r[0], service_id=r[1], host=r[2], port=r[3], started=r[4], last_heartbeat=r[5])
                for r in rows]

    def close(self) -> None:
        pass


class NaiveCassandraRegistry:
    """The original deployment's latency bug: a new cluster connection for every request."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec

    def heartbeat(self, sid: str) -> bool:
        with open_registry(self.spec) as reg:
            return reg.heartbeat(sid)

    def lookup(self, role: str) -> list:
        with open_registry(self.spec) as reg:
            return reg.lookup(role)

    def close(self) -> None:
        pass


def open_bench_registry(kind: str, spec: ClusterSpec):
    if kind == "naive-cassandra":
        return NaiveCassandraRegistry(spec)
    if kind == "naive-sqlite":
        return NaiveSqliteRegistry(Path(spec.registry.sqlite).with_suffix(".naive"), spec.registry.ttl)
    return open_registry(spec)


def heartbeat_worker(kind: str, spec: ClusterSpec, ids: list[str], seconds: float, start_at: float,
                     out: "multiprocessing.Queue[int]") -> None:
    reg = open_bench_registry(kind, spec)
    while time.time() < start_at:
        time.sleep(0.001)
    done, deadline, i = 0, start_at + seconds, 0
    while time.time() < deadline:
        done += reg.heartbeat(ids[i % len(ids)])
        i += 1
    reg.close()
    out.put(done)


def percentile(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[int(q) - 1] if len(samples) > 1 else samples[0]


def bench(kind: str, spec: ClusterSpec, n: int, seconds: float, lookups: int,
          register: bool = True) -> dict[str, float]:
    """register=False measures against the services an earlier run registered in the same spec."""
    ids = service_ids(n)
    reg = open_bench_registry(kind, spec)
    t0 = time.perf_counter()
    for role, sid in ids if register else ():
        reg.register(Service(role=role, service_id=sid, host="10.0.0.1", port=6000, hypervisor="hv",
                             scheduler="slurm", job_id=sid, image="demo@1"))
    register_s = time.perf_counter() - t0 if register else float("nan")
    rng = random.Random(1)
    lat = []
    for _ in range(lookups):
        role = rng.choice(list(ROLES))
        t = time.perf_counter()
        reg.lookup(role)
        lat.append((time.perf_counter() - t) * 1000)
    reg.close()
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[int] = ctx.Queue()
    start_at = time.time() + 1.0
    chunks = [[sid for _, sid in ids[i::HEARTBEAT_PROCS]] for i in range(HEARTBEAT_PROCS)]
    procs = [ctx.Process(target=heartbeat_worker, args=(kind, spec, c, seconds, start_at, out)) for c in chunks]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=seconds + 120) for _ in procs)
    for p in procs:
        p.join()
    return {"register_s": register_s, "lookup_p50_ms": percentile(lat, 50), "lookup_p99_ms": percentile(lat, 99),
            "heartbeats_per_s": total / seconds}


def make_cassandra_spec(workdir: Path, contact_points: list[str]) -> ClusterSpec:
    # 5 s instead of the default 1 s request timeout: the benchmark shares two cores with the node.
    text = (f"store: {workdir}/store\nregistry: {{ttl: 600, cassandra: {{contact_points: "
            f"[{', '.join(contact_points)}], keyspace: bench_{int(time.time())}, request_timeout: 5}}}}\n"
            "roles: {sage: {image: demo@1, port: 6000}, hub: {image: demo@1, port: 8080},"
            " cassandra: {image: demo@1, port: 9042}}\n")
    return parse_spec(text, workdir / "cluster.yaml")


@contextlib.contextmanager
def cassandra_contact_points(given: str | None, workdir: Path) -> Iterator[list[str]]:
    """The cluster given on the command line, else a temporary node of scripts/cassandra."""
    if given:
        yield given.split(",")
        return
    from tests.fixtures.cassandra import free_loopback_addresses, start_node, stop_node

    (address,) = free_loopback_addresses(1, first=20)
    t0 = time.perf_counter()
    start_node(workdir / "cassandra", address, cluster_name="salvus-bench")
    print(f"cassandra: a node on {address} answered CQL after {time.perf_counter() - t0:.1f}s", flush=True)
    try:
        yield [address]
    finally:
        stop_node(workdir / "cassandra")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=3.0, help="heartbeat phase length")
    ap.add_argument("--lookups", type=int, default=300)
    ap.add_argument("--backend", choices=["sqlite", "cassandra"], default="sqlite",
                    help="cassandra: also measure the Cassandra backend, next to SQLite")
    ap.add_argument("--cassandra", metavar="HOST,..", help="an existing cluster instead of a temporary node")
    ap.add_argument("--naive-lookups", type=int, default=20,
                    help="lookups for naive-cassandra (each opens a cluster connection)")
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec = make_sqlite_spec(Path(tmp))
        for kind in ("sqlite", "naive-sqlite"):
            results[kind] = bench(kind, spec, args.services, args.seconds, args.lookups)
        if args.backend == "cassandra":
            with cassandra_contact_points(args.cassandra, Path(tmp)) as contact_points:
                cspec = make_cassandra_spec(Path(tmp), contact_points)
                results["cassandra"] = bench("cassandra", cspec, args.services, args.seconds, args.lookups)
                results["naive-cassandra"] = bench("naive-cassandra", cspec, args.services, args.seconds,
                                                   args.naive_lookups, register=False)
    print(f"{'backend':<16} {'register_s':>10} {'lookup_p50_ms':>14} {'lookup_p99_ms':>14} {'heartbeats/s':>13}")
    for kind, r in results.items():
        print(f"{kind:<16} {r['register_s']:>10.2f} {r['lookup_p50_ms']:>14.2f} {r['lookup_p99_ms']:>14.2f} "
              f"{r['heartbeats_per_s']:>13.0f}")
    ours, naive = results["sqlite"], results["naive-sqlite"]
    last = (f"lookup_p50_ms={ours['lookup_p50_ms']:.2f} lookup_p99_ms={ours['lookup_p99_ms']:.2f} "
            f"heartbeats_per_s={ours['heartbeats_per_s']:.0f} naive_lookup_p50_ms={naive['lookup_p50_ms']:.2f} "
            f"naive_heartbeats_per_s={naive['heartbeats_per_s']:.0f}")
    if "cassandra" in results:
        cas, cnaive = results["cassandra"], results["naive-cassandra"]
        last += (f" cassandra_register_s={cas['register_s']:.1f} cassandra_lookup_p50_ms={cas['lookup_p50_ms']:.2f}"
                 f" cassandra_lookup_p99_ms={cas['lookup_p99_ms']:.2f}"
                 f" cassandra_heartbeats_per_s={cas['heartbeats_per_s']:.0f}"
                 f" naive_cassandra_lookup_p50_ms={cnaive['lookup_p50_ms']:.2f}"
                 f" naive_cassandra_heartbeats_per_s={cnaive['heartbeats_per_s']:.0f}")
    print(last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
