"""Registry benchmark: 10,000 services; lookup-by-role latency and heartbeat throughput.

Our SQLite backend (WAL, role index, one connection per process, one short transaction per
operation) next to the naive way (rollback journal, no index, a new connection per operation) in
the same run. Figures are printed, not asserted; the last line is `key=value` pairs.

    .venv/bin/python benchmarks/registry_bench.py [--services 10000] [--seconds 3]
"""
from __future__ import annotations

import argparse
import multiprocessing
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

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


def open_bench_registry(kind: str, spec: ClusterSpec):
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


def bench(kind: str, spec: ClusterSpec, n: int, seconds: float, lookups: int) -> dict[str, float]:
    ids = service_ids(n)
    reg = open_bench_registry(kind, spec)
    t0 = time.perf_counter()
    for role, sid in ids:
        reg.register(Service(role=role, service_id=sid, host="10.0.0.1", port=6000, hypervisor="hv",
                             scheduler="slurm", job_id=sid, image="demo@1"))
    register_s = time.perf_counter() - t0
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=3.0, help="heartbeat phase length")
    ap.add_argument("--lookups", type=int, default=300)
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec = make_sqlite_spec(Path(tmp))
        for kind in ("sqlite", "naive-sqlite"):
            results[kind] = bench(kind, spec, args.services, args.seconds, args.lookups)
    print(f"{'backend':<14} {'register_s':>10} {'lookup_p50_ms':>14} {'lookup_p99_ms':>14} {'heartbeats/s':>13}")
    for kind, r in results.items():
        print(f"{kind:<14} {r['register_s']:>10.2f} {r['lookup_p50_ms']:>14.2f} {r['lookup_p99_ms']:>14.2f} "
              f"{r['heartbeats_per_s']:>13.0f}")
    ours, naive = results["sqlite"], results["naive-sqlite"]
    print(f"lookup_p50_ms={ours['lookup_p50_ms']:.2f} lookup_p99_ms={ours['lookup_p99_ms']:.2f} "
          f"heartbeats_per_s={ours['heartbeats_per_s']:.0f} naive_lookup_p50_ms={naive['lookup_p50_ms']:.2f} "
          f"naive_heartbeats_per_s={naive['heartbeats_per_s']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
