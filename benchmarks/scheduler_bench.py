"""Scheduler benchmark: demo VMs up and down on the local executor, Slurm and HTCondor, side by side.

In one run: the local executor, a real one-node Slurm (tests/fixtures/slurm.py `running_slurm`)
and the real HTCondor pool (tests/fixtures/condor.py `running_pool`: a central manager and two
execute nodes, HTCondor 23.9 in its Debian 13 root), for 1 and 4 VMs by default.

Up: from issuing `salvus_jobs scale sage=N` until `salvus_jobs services --json sage` lists N
services. Down: from issuing `salvus_jobs stop sage` until `salvus_jobs status --json` shows none
registered and no job of the role left in the queue (every job gone or finished; a removed
HTCondor job still in the queue, a COMPLETING Slurm job, count as left). Each figure is taken when
the poll that saw it returned; the median poll is printed beside it (the resolution), as are the
seconds the `scale` and `stop` commands themselves took. Each scheduler's intervals are printed
first: Slurm's SchedulerParameters from the fixture's slurm.conf, HTCondor's NEGOTIATOR_INTERVAL,
SCHEDD_INTERVAL and UPDATE_INTERVAL as `condor_config_val` reports them inside the root.

The local executor and Slurm run as this process's user (root: the fixtures need it). On HTCondor
the operator's commands run inside the root as the site's account `salvus` (CondorPool.run), on a
site spec under `pool.workdir()` that `salvus` owns, with the demo image copied there: the site of
tests/test_condor_live.py (its `Site`, imported). Real demo VMs under TCG: the figures move with
the machine's load; printed, not asserted. The last line is `key=value` pairs: `SCHED_up_s` and
`SCHED_down_s` for 4 VMs, the same keys suffixed `_N` for every other count (`_1`); a count that
never got there is `inf`.

Not benchmarked: HTCondor's own VM universe (`universe = vm` through condor_vm-gahp, Debian 13's
`condor-vm-gahp`). Tried by hand in a copy of the test root with libvirt 11.3: the startd advertised
`HasVM = true`, libvirt refused to start QEMU in a chroot ("Failed disable mount propagation out of
the root filesystem"; `namespaces = []` in qemu.conf gets past that) and QEMU then aborted under
`-accel kvm` ("failed to set MSR 0x10a": this machine's kvm-pvm cannot run a stock guest). The VM
universe's kvm type has no TCG fallback; salvus jobs are vanilla jobs that run QEMU themselves.

    .venv/bin/python benchmarks/scheduler_bench.py [--counts 1,4] [--schedulers local,slurm,condor]
        [--timeout 300]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobwrappers.demo_image import DemoImage, build_demo_image  # noqa: E402
from tests.fixtures.demo_image import demo_spec_text  # noqa: E402

SALVUS_JOBS = str(Path(sys.executable).parent / "salvus_jobs")
SCHEDULERS = ("local", "slurm", "condor")
ROLE = "sage"
HEADLINE = 4  # the count whose keys carry no suffix
POLL_PAUSE = 0.2
CONDOR_INTERVALS = ("NEGOTIATOR_INTERVAL", "SCHEDD_INTERVAL", "UPDATE_INTERVAL")

# salvus_jobs ARGS... as the scheduler's operator runs it: (args, timeout) -> CompletedProcess.
Cli = Callable[..., subprocess.CompletedProcess]


@dataclass
class Result:
    up: float = float("inf")
    down: float = float("inf")
    scale_cmd: float = 0.0
    stop_cmd: float = 0.0
    polls: list[float] = field(default_factory=list)

    @property
    def poll(self) -> float:
        return statistics.median(self.polls) if self.polls else 0.0


def local_cli(spec: Path) -> Cli:
    def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([SALVUS_JOBS, "--spec", str(spec), *args], capture_output=True, text=True,
                              timeout=timeout)
    return cli


def write_spec(work: Path, image: DemoImage, backend: str, site: str) -> Path:
    path = work / f"{site}.yaml"
    path.write_text(f"site: {site}\nscheduler: {{backend: {backend}}}\n" + demo_spec_text(image, work / f"store-{site}"))
    return path


def checked(r: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if r.returncode != 0:
        raise SystemExit(f"salvus_jobs {what} exited {r.returncode}: {(r.stderr or r.stdout).strip()[-2000:]}")
    return r


def wait_until(t0: float, timeout: float, probe: Callable[[], bool], polls: list[float]) -> float:
    """Seconds from t0 until `probe` says so (when that poll returned); inf after `timeout`."""
    while time.monotonic() - t0 < timeout:
        start = time.monotonic()
        ok = probe()
        end = time.monotonic()
        polls.append(end - start)
        if ok:
            return end - t0
        time.sleep(POLL_PAUSE)
    return float("inf")


def registered(cli: Cli, n: int) -> bool:
    r = cli("services", "--json", ROLE)
    return r.returncode == 0 and len(json.loads(r.stdout)) == n


def all_gone(cli: Cli) -> bool:
    r = cli("status", "--json")
    if r.returncode != 0:
        return False
    st = json.loads(r.stdout)
    return st["roles"][ROLE]["registered"] == 0 and not [j for j in st["jobs"] if j["role"] == ROLE]


def measure(cli: Cli, n: int, timeout: float, stop_timeout: float) -> Result:
    """`scale sage=N` to N registered, then `stop sage` to none registered and none queued."""
    res = Result()
    try:
        t0 = time.monotonic()
        checked(cli("scale", f"{ROLE}={n}"), f"scale {ROLE}={n}")
        res.scale_cmd = time.monotonic() - t0
        res.up = wait_until(t0, timeout, lambda: registered(cli, n), res.polls)
        t1 = time.monotonic()
        checked(cli("stop", ROLE, timeout=stop_timeout), f"stop {ROLE}")
        res.stop_cmd = time.monotonic() - t1
        res.down = wait_until(t1, timeout, lambda: all_gone(cli), res.polls)
    finally:
        cli("stop", "--all", timeout=stop_timeout)  # whatever a failure left running
    return res


def report(scheduler: str, n: int, res: Result) -> None:
    print(f"  {scheduler:6s} {n} VM(s): up {res.up:6.1f} s, down {res.down:6.1f} s "
          f"(scale {res.scale_cmd:.1f} s, stop {res.stop_cmd:.1f} s, median poll {res.poll:.2f} s)", flush=True)


def run_local(work: Path, image: DemoImage, counts: list[int], timeout: float) -> tuple[dict[int, Result], str]:
    out = {}
    for n in counts:
        out[n] = measure(local_cli(write_spec(work, image, "local", f"benchlocal{n}")), n, timeout, 120)
        report("local", n, out[n])
    return out, "no scheduling cycle: `scale` starts each job's supervisor itself"


def slurm_intervals(conf: Path) -> str:
    params = next((line.split("=", 1)[1] for line in conf.read_text().splitlines()
                   if line.startswith("SchedulerParameters=")), "")
    values = dict(p.split("=", 1) for p in params.split(",") if "=" in p)
    interval = values.get("sched_interval", "60 (Slurm's default)")
    return f"SchedulerParameters={params or '(none)'}: sched_interval {interval} s (from {conf.name})"


def run_slurm(work: Path, image: DemoImage, counts: list[int], timeout: float) -> tuple[dict[int, Result], str]:
    from tests.fixtures.slurm import running_slurm  # imported here: the local half needs no Slurm

    out = {}
    with running_slurm() as cluster:  # sets $SLURM_CONF for us and every salvus_jobs we start
        intervals = slurm_intervals(cluster.conf)
        print(f"  slurm intervals: {intervals}", flush=True)
        for n in counts:
            # A site per count: one count's COMPLETING jobs are never the next one's.
            out[n] = measure(local_cli(write_spec(work, image, "slurm", f"benchslurm{n}")), n, timeout, 120)
            report("slurm", n, out[n])
    return out, intervals


def run_condor(image: DemoImage, counts: list[int], timeout: float) -> tuple[dict[int, Result], str]:
    # Imported here: the local half needs no HTCondor (nor the bindings).
    from tests.fixtures.condor import JOB_MAX_VACATE_S, JOB_USER, running_pool
    from tests.test_condor_live import Site

    out = {}
    with running_pool() as pool:
        intervals = ", ".join(f"{name} {pool.check('condor_config_val', name).strip()} s" for name in CONDOR_INTERVALS)
        print(f"  condor intervals (condor_config_val in the root): {intervals}", flush=True)
        # The demo guest where the job user can read it, as the tests' condor_image fixture puts it.
        d = pool.workdir()
        try:
            for p in image.paths():
                shutil.copy(p, d / p.name)
            subprocess.run(["chown", "-R", f"{JOB_USER}:{JOB_USER}", str(d)], check=True)
            pool_image = DemoImage(*(d / p.name for p in image.paths()))
            for n in counts:
                site = Site(pool, pool_image)
                try:
                    out[n] = measure(site.salvus_jobs, n, timeout, JOB_MAX_VACATE_S + 60)
                finally:
                    site.stop()
                report("condor", n, out[n])
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return out, intervals


def keys(results: dict[str, dict[int, Result]], counts: list[int]) -> str:
    def suffix(n: int) -> str:
        return "" if n == HEADLINE else f"_{n}"
    ordered = [n for n in counts if n == HEADLINE] + [n for n in counts if n != HEADLINE]
    pairs = [f"{s}_{what}_s{suffix(n)}={getattr(results[s][n], what):.1f}"
             for n in ordered for what in ("up", "down") for s in results]
    return " ".join(pairs)


def counts_arg(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"expected VM counts like 1,4, got {text!r}")
    return sorted(set(counts))


def schedulers_arg(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in SCHEDULERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected some of {','.join(SCHEDULERS)}, got {text!r}")
    return [s for s in SCHEDULERS if s in names]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=counts_arg, default=[1, 4], help="VM counts (default 1,4)")
    ap.add_argument("--schedulers", type=schedulers_arg, default=list(SCHEDULERS),
                    help="some of local,slurm,condor (default all three)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds each of up and down may take (then inf)")
    args = ap.parse_args()
    if {"slurm", "condor"} & set(args.schedulers) and os.geteuid() != 0:
        raise SystemExit("scheduler_bench: Slurm and HTCondor are started by their test fixtures, which need root")
    results: dict[str, dict[int, Result]] = {}
    intervals: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="salvus-scheduler-bench-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # slurmd's jobs and the store's users reach it
        image = build_demo_image(work / "image")
        print(f"demo guest, counts {','.join(map(str, args.counts))}; registry heartbeat 1 s, ttl 6 s "
              "(tests/fixtures/demo_image.py demo_spec_text)", flush=True)
        for s in args.schedulers:
            print(f"{s}:", flush=True)
            if s == "local":
                results[s], intervals[s] = run_local(work, image, args.counts, args.timeout)
            elif s == "slurm":
                results[s], intervals[s] = run_slurm(work, image, args.counts, args.timeout)
            else:
                results[s], intervals[s] = run_condor(image, args.counts, args.timeout)
    print("\nintervals:")
    for s in args.schedulers:
        print(f"  {s:6s} {intervals[s]}")
    print(f"\n{'scheduler':9s} {'VMs':>3s} {'up s':>7s} {'down s':>7s} {'scale s':>8s} {'stop s':>7s} {'poll s':>7s}")
    for s in args.schedulers:
        for n in args.counts:
            r = results[s][n]
            print(f"{s:9s} {n:3d} {r.up:7.1f} {r.down:7.1f} {r.scale_cmd:8.1f} {r.stop_cmd:7.1f} {r.poll:7.2f}")
    print(keys(results, args.counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
