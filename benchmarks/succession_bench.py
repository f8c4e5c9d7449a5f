"""Succession benchmark: a role of count 2 whose jobs keep reaching their walltime, for N minutes,
with the controller (successors submitted ahead of the earliest signal, predecessors drained once
the successors are healthy) and, side by side within the same minutes, the naive way (a cron-style
`scale` every interval: a job is replaced only after its walltime ended it).

Per backend (the local executor, which enforces `scheduler.walltime` as a batch scheduler does, and
a real Slurm started as the tests start one): successions, the minimum healthy / desired (a
service counts once it is registered and answers its probe, asked by this script every second),
the seconds sampled below desired, the lead time the controller used, and jobs that ended by their
walltime before they were drained. Real demo VMs under TCG: the figures move with the machine's
load; printed, not asserted. The last line is `key=value` pairs.

    .venv/bin/python benchmarks/succession_bench.py [--backend local|slurm|all] [--minutes 10]

Walltimes: local 90 s (signalled at the limit); Slurm 3 minutes (a job asks for
--signal=B:TERM@(grace + 60) and may be signalled 60 s before that: 40 s after it starts with the
5 s stop_timeout used here), so every job meets its walltime several times over a run.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.registry import open_registry  # noqa: E402
from cluster.spec import load_spec  # noqa: E402
from jobwrappers.demo_image import build_demo_image  # noqa: E402
from jobwrappers.probe import probe_once  # noqa: E402
from tests.fixtures.demo_image import demo_spec_text  # noqa: E402

SALVUS_JOBS = str(Path(sys.executable).parent / "salvus_jobs")
COUNT = 2
INTERVAL = 2
WALLTIME = {"local": "01:30", "slurm": "3"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_spec(work: Path, demo, backend: str, site: str) -> Path:
    text = demo_spec_text(demo, work / "store").replace(
        "    port: 6000\n", f"    port: 6000\n    count: {COUNT}\n    drain_seconds: 2\n    stop_timeout: 5\n", 1)
    path = work / "cluster.yaml"
    path.write_text(f"site: {site}\nscheduler: {{backend: {backend}, walltime: '{WALLTIME[backend]}'}}\n"
                    f"controller: {{interval: {INTERVAL}, lease: {3 * INTERVAL}, listen: '127.0.0.1:{free_port()}', "
                    f"lead_floor: 20}}\n" + text)
    return path


class Sampler:
    """Healthy registered sage services, every second, once the count was first reached."""

    def __init__(self, spec_path: Path) -> None:
        self.spec = load_spec(spec_path)
        self.low: int | None = None
        self.below_s = 0
        self.armed = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def healthy(self) -> int:
        try:
            with open_registry(self.spec) as reg:
                rows = reg.lookup("sage")
        except Exception:
            return 0
        n = 0
        for s in rows:
            with contextlib.suppress(OSError):
                probe_once(s.host, s.port, self.spec.roles["sage"].probe)
                n += 1
        return n

    def _run(self) -> None:
        while not self.stop.is_set():
            n = self.healthy()
            self.armed = self.armed or n >= COUNT
            if self.armed:
                self.low = n if self.low is None else min(self.low, n)
                self.below_s += n < COUNT
            self.stop.wait(1.0)


def cli(spec: Path, *args: str) -> None:
    subprocess.run([SALVUS_JOBS, "--spec", str(spec), *args], capture_output=True, text=True, timeout=300)


def run_pair(backend: str, minutes: float, demo, work: Path) -> dict[str, dict]:
    """Ours and the naive way on `backend`, at once, for `minutes`."""
    ours, naive = work / f"{backend}-ours", work / f"{backend}-naive"
    ours.mkdir()
    naive.mkdir()
    ours_spec = write_spec(ours, demo, backend, f"b{backend[0]}o")
    naive_spec = write_spec(naive, demo, backend, f"b{backend[0]}n")
    log = ours / "controller.log"
    ctl = subprocess.Popen([SALVUS_JOBS, "--spec", str(ours_spec), "controller"], stdout=subprocess.DEVNULL,
                           stderr=open(log, "w"))
    stop_cron = threading.Event()

    def cron() -> None:
        while not stop_cron.is_set():
            cli(naive_spec, "scale")
            stop_cron.wait(INTERVAL)

    cron_thread = threading.Thread(target=cron, daemon=True)
    cron_thread.start()
    samplers = {"ours": Sampler(ours_spec), "naive": Sampler(naive_spec)}
    lead = 0.0
    try:
        start = time.monotonic()
        while not all(s.armed for s in samplers.values()) and time.monotonic() - start < 300:
            time.sleep(1)
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end:
            time.sleep(5)
            with contextlib.suppress(Exception):
                import json
                import urllib.request

                port = load_spec(ours_spec).controller.listen.rpartition(":")[2]
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
                    lead = json.loads(r.read())["roles"]["sage"]["lead_s"]
            elapsed = minutes * 60 - (end - time.monotonic())
            print(f"  {backend}: {elapsed:5.0f}s  ours healthy>={samplers['ours'].low} below {samplers['ours'].below_s}s"
                  f"  naive healthy>={samplers['naive'].low} below {samplers['naive'].below_s}s", flush=True)
    finally:
        stop_cron.set()
        cron_thread.join(60)
        ctl.terminate()
        ctl.wait(30)
        for s in samplers.values():
            s.stop.set()
        for spec in (ours_spec, naive_spec):
            cli(spec, "stop", "--all")
    text = log.read_text()
    out = {name: {"min_healthy": s.low if s.low is not None else 0, "below_s": s.below_s}
           for name, s in samplers.items()}
    out["ours"].update(successions=text.count("succession: sage job"), drained=text.count("drained: sage job"),
                       walltime_ended=text.count("walltime: sage job"), lead_s=lead)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("local", "slurm", "all"), default="all")
    ap.add_argument("--minutes", type=float, default=10.0, help="in all (split between the backends)")
    args = ap.parse_args()
    backends = ["local", "slurm"] if args.backend == "all" else [args.backend]
    minutes = args.minutes / len(backends)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="succession-bench-") as tmp:
        work = Path(tmp)
        demo = build_demo_image(work / "demo")
        for backend in backends:
            print(f"{backend}: count {COUNT}, walltime {WALLTIME[backend]}, {minutes:g} min, ours and naive at once",
                  flush=True)
            if backend == "slurm":
                if not shutil.which("slurmctld") and not Path("/usr/sbin/slurmctld").exists():
                    raise SystemExit("slurm: not installed (scripts/setup slurm)")
                from tests.fixtures.slurm import running_slurm

                with running_slurm():
                    results[backend] = run_pair(backend, minutes, demo, work)
            else:
                results[backend] = run_pair(backend, minutes, demo, work)
    print(f"{'backend':8s} {'way':6s} {'min_healthy':>11s} {'desired':>7s} {'below_s':>7s} {'successions':>11s} "
          f"{'walltime_ended':>14s} {'lead_s':>6s}")
    for backend, r in results.items():
        o, n = r["ours"], r["naive"]
        print(f"{backend:8s} {'ours':6s} {o['min_healthy']:>11d} {COUNT:>7d} {o['below_s']:>7d} {o['successions']:>11d} "
              f"{o['walltime_ended']:>14d} {o['lead_s']:>6.0f}")
        print(f"{backend:8s} {'naive':6s} {n['min_healthy']:>11d} {COUNT:>7d} {n['below_s']:>7d}")
    parts = []
    for backend, r in results.items():
        o, n = r["ours"], r["naive"]
        parts += [f"{backend}_min_healthy={o['min_healthy']}", f"{backend}_desired={COUNT}",
                  f"{backend}_below_s={o['below_s']}", f"{backend}_successions={o['successions']}",
                  f"{backend}_walltime_ended={o['walltime_ended']}", f"{backend}_lead_s={o['lead_s']:.0f}"]
        prefix = "naive" if backend == backends[0] else f"{backend}_naive"
        parts += [f"{prefix}_min_healthy={n['min_healthy']}", f"{prefix}_below_s={n['below_s']}"]
    parts.append(f"successions={sum(r['ours']['successions'] for r in results.values())}")
    print(" ".join(parts))


if __name__ == "__main__":
    main()
