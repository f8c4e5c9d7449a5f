"""Controller benchmark: time from a fault to healthy again, per fault kind, with the controller and
the naive way (a cron-style `scale` every interval), with demo VMs, count 2, on the local executor
and on a real one-node Slurm (started as the tests start theirs: tests/fixtures/slurm.py).

Faults, one at a time, each once the role is healthy: `kill` (a VM's QEMU SIGKILLed), `hang` (a
VM's QEMU SIGSTOPped: the wrapper still heartbeats), and on the local executor `supervisor` (a
job's local supervisor SIGKILLed: its VM runs on, unsupervised). On Slurm the third is `batchkill`:
`scancel --batch --signal=KILL` of the job, SIGKILL to its batch step's process (the wrapper, by
`exec`) with no grace. That is what a real site sees: a user's or an admin's `scancel -s KILL`, or
the kernel's OOM killer picking the step. Killing slurmstepd itself is not: Slurm protects it from
the OOM killer, it dies only of its own bugs, and when it does slurmctld keeps the job RUNNING
(over 3 minutes, measured) whatever became of its processes: no scheduler query shows it.

Healthy again: two services registered, each answering its probe (asked by this script, not the
controller), none of them the hung one, every job supervised (local: a live supervisor; Slurm: the
job RUNNING in squeue), at most two QEMU processes (more, sampled throughout, count as duplicates).
A fault not recovered within the timeout is `inf`. Real VMs (TCG here): figures move with the
machine's load; printed, not asserted. The last line is `key=value` pairs.

    .venv/bin/python benchmarks/controller_bench.py [--backend local|slurm|all] [--interval 2]
        [--timeout 60] [--slurm-timeout 240]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.files import pid_alive  # noqa: E402
from cluster.registry import open_registry  # noqa: E402
from cluster.spec import load_spec  # noqa: E402
from jobwrappers.demo_image import build_demo_image  # noqa: E402
from jobwrappers.probe import probe_once  # noqa: E402
from submit import open_backend  # noqa: E402
from tests.fixtures.demo_image import demo_spec_text, store_qemu_pids  # noqa: E402

SALVUS_JOBS = str(Path(sys.executable).parent / "salvus_jobs")
COUNT = 2
FAULTS = {"local": ("kill", "hang", "supervisor"), "slurm": ("kill", "hang", "batchkill")}


def write_spec(work: Path, interval: float, backend: str, mode: str) -> Path:
    path = work / "cluster.yaml"
    # Slurm: a site per mode, so one run's jobs (COMPLETING a while) are never the next one's.
    head = "site: bench\n" if backend == "local" else f"site: bench{mode}\nscheduler: {{backend: slurm}}\n"
    path.write_text(f"{head}controller: {{interval: {interval}, lease: {max(4, int(interval * 3))}, "
                    "listen: '127.0.0.1:0', unhealthy_after: 2, probe_timeout: 1}\n"
                    + demo_spec_text(build_demo_image(work / "image"), work / "store"))
    return path


def cli(spec: Path, *args: str) -> str:
    return subprocess.run([SALVUS_JOBS, "--spec", str(spec), *args], capture_output=True, text=True,
                          timeout=300).stdout


class Watch:
    """Samples the QEMU count in the background: the most seen at once, for duplicates. A hung VM
    (in `hung`) is not counted: its replacement boots while it is being stopped, by design."""

    def __init__(self, store: str) -> None:
        self.store, self.most, self.stop = store, 0, threading.Event()
        self.hung: set[int] = set()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.most = max(self.most, len(set(store_qemu_pids(self.store)) - self.hung))
            time.sleep(0.2)


def local_state(spec, job_id: str, suffix: str) -> dict:
    try:
        return json.loads((spec.store_path / "state" / "local-jobs" / f"{job_id}.{suffix}").read_text())
    except (OSError, ValueError):
        return {}


def running(pid: object) -> bool:
    """Alive and not a zombie (a killed supervisor stays one until its parent reaps it)."""
    try:
        return isinstance(pid, int) and pid > 0 and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def supervised(spec, job) -> bool:
    """The job's supervisor is there: the local executor's supervisor process; Slurm's RUNNING state."""
    if spec.scheduler.backend == "local":
        return running(local_state(spec, job.job_id, "json").get("pid"))
    return job.state == "running"


def healthy(spec, exclude: set[str]) -> bool:
    with open_registry(spec) as reg:
        services = [s for s in reg.lookup("sage") if s.service_id not in exclude]
    if len(services) != COUNT or len(store_qemu_pids(spec.store_path)) > COUNT:
        return False
    jobs = {j.service_id: j for j in open_backend(spec).list("sage")}
    for s in services:
        job = jobs.get(s.service_id)
        if job is None or not supervised(spec, job):
            return False
        try:
            probe_once(s.host, s.port, spec.roles["sage"].probe)
        except OSError:
            return False
    return True


def wait_healthy(spec, exclude: set[str], timeout: float, t0: float | None = None) -> float:
    """Seconds from `t0` (default now) until healthy; inf after `timeout`."""
    t0 = time.monotonic() if t0 is None else t0
    while time.monotonic() - t0 < timeout:
        if healthy(spec, exclude):
            return time.monotonic() - t0
        time.sleep(0.25)
    return float("inf")


def qemu_of(spec, job) -> int:
    """The job's QEMU: the local wrapper's child; on Slurm the one named after its service id."""
    if spec.scheduler.backend == "local":
        wrapper = local_state(spec, job.job_id, "state")["wrapper_pid"]
        children = Path(f"/proc/{wrapper}/task/{wrapper}/children").read_text().split()
        return next(int(c) for c in children if b"qemu-system" in Path(f"/proc/{c}/cmdline").read_bytes())
    needle = f"guest={job.service_id},".encode()
    return next(pid for pid in store_qemu_pids(spec.store_path)
                if needle in Path(f"/proc/{pid}/cmdline").read_bytes())


def inject(spec, fault: str) -> tuple[set[str], int | None]:
    """Injects `fault` into the oldest job; returns the service ids never to count again, and a
    stopped pid to resume afterwards."""
    job = sorted((j for j in open_backend(spec).list("sage") if j.state == "running"), key=lambda j: j.submitted)[0]
    if fault == "supervisor":
        os.kill(local_state(spec, job.job_id, "json")["pid"], signal.SIGKILL)
        return set(), None
    if fault == "batchkill":
        subprocess.run(["scancel", "--batch", "--signal=KILL", job.job_id], check=True, capture_output=True, timeout=30)
        return set(), None
    qemu = qemu_of(spec, job)
    if fault == "kill":
        os.kill(qemu, signal.SIGKILL)
        return set(), None
    os.kill(qemu, signal.SIGSTOP)
    return {job.service_id}, qemu


def run_mode(spec_path: Path, mode: str, interval: float, timeout: float) -> dict[str, float]:
    spec = load_spec(spec_path)
    faults = FAULTS[spec.scheduler.backend]
    watch = Watch(str(spec.store_path))
    helper: subprocess.Popen | None = None
    stop_cron = threading.Event()
    if mode == "controller":
        helper = subprocess.Popen([SALVUS_JOBS, "--spec", str(spec_path), "controller"],
                                  stdout=subprocess.DEVNULL, stderr=open(spec_path.parent / "controller.log", "w"))
        time.sleep(1)
        cli(spec_path, "scale", f"sage={COUNT}")
    else:
        def cron() -> None:
            while not stop_cron.is_set():
                cli(spec_path, "scale", f"sage={COUNT}")
                stop_cron.wait(interval)
        threading.Thread(target=cron, daemon=True).start()
    results: dict[str, float] = {}
    try:
        if wait_healthy(spec, set(), 240) == float("inf"):
            raise SystemExit(f"{mode}: the role never became healthy")
        for fault in faults:
            t0 = time.monotonic()
            exclude, stopped = inject(spec, fault)
            if stopped is not None:
                watch.hung.add(stopped)
            # The fault must show first (a killed process takes a moment to go).
            deadline = time.monotonic() + 10
            while healthy(spec, exclude) and time.monotonic() < deadline:
                time.sleep(0.1)
            results[fault] = wait_healthy(spec, exclude, timeout, t0)
            print(f"  {spec.scheduler.backend:5s} {mode:10s} {fault:10s} healthy again after {results[fault]:.1f} s",
                  flush=True)
            if stopped is not None and pid_alive(stopped):
                os.kill(stopped, signal.SIGCONT)
            if results[fault] == float("inf"):
                # Start the next fault from a clean role: stop everything, scale again.
                cli(spec_path, "stop", "--all")
                cli(spec_path, "scale", f"sage={COUNT}")
                wait_healthy(spec, set(), 240)
    finally:
        stop_cron.set()
        if helper is not None:
            helper.terminate()
            helper.wait(30)
        cli(spec_path, "stop", "--all")
        watch.stop.set()
    results["duplicates"] = max(0, watch.most - COUNT)
    return results


def run_backend(tmp: Path, backend: str, interval: float, timeout: float) -> dict[str, dict[str, float]]:
    results = {}
    for mode in ("controller", "naive"):
        work = tmp / f"{backend}-{mode}"
        work.mkdir()
        results[mode] = run_mode(write_spec(work, interval, backend, mode), mode, interval, timeout)
    return results


def keys(backend: str, results: dict[str, dict[str, float]]) -> list[str]:
    """`BACKEND_recover_FAULT_s=…` then `naive_…`; the local naive keys keep their old names."""
    naive = "naive" if backend == "local" else f"naive_{backend}"
    return ([f"{backend}_recover_{f}_s={results['controller'][f]:.1f}" for f in FAULTS[backend]]
            + [f"{naive}_recover_{f}_s={results['naive'][f]:.1f}" for f in FAULTS[backend]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("local", "slurm", "all"), default="all")
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to recover, local executor")
    ap.add_argument("--slurm-timeout", type=float, default=240.0,
                    help="seconds to recover on Slurm (a requeued job waits out Slurm's own delays)")
    args = ap.parse_args()
    backends = ("local", "slurm") if args.backend == "all" else (args.backend,)
    line, duplicates = [], 0
    with tempfile.TemporaryDirectory(prefix="controller-bench-") as tmp:
        for backend in backends:
            if backend == "slurm":
                # Imported here: the local half needs no Slurm installed.
                from tests.fixtures.slurm import running_slurm

                with running_slurm():  # sets $SLURM_CONF for us and every salvus_jobs we start
                    results = run_backend(Path(tmp), backend, args.interval, args.slurm_timeout)
            else:
                results = run_backend(Path(tmp), backend, args.interval, args.timeout)
            line += keys(backend, results)
            duplicates += int(results["controller"]["duplicates"] + results["naive"]["duplicates"])
    print(" ".join(line + [f"duplicates={duplicates}", f"interval_s={args.interval:g}"]))


if __name__ == "__main__":
    main()
