"""`scale` against a real queue, ours vs naive, and submit-to-registered per backend.

1. Planning: 2,000 held jobs of one role in a real Slurm (started here, as the tests do).
   Ours: `salvus_jobs scale --dry-run` — one `squeue` for every role, one `scontrol` for the hold
   reasons. Naive: one `scontrol show job ID` per job (what a per-job status API such as DRMAA
   forces), timed on a sample and scaled to 2,000.
2. One VM from `scale sage=1` to registered: through Slurm (sbatch, scheduling, slurmd launch) vs
   the local executor, on the demo image.

    .venv/bin/python benchmarks/scale_bench.py [--jobs 2000] [--naive-sample 200]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cluster.registry import open_registry  # noqa: E402
from cluster.spec import load_spec  # noqa: E402
from jobwrappers.demo_image import build_demo_image  # noqa: E402
from submit import open_backend  # noqa: E402
from submit.scale import plan_scale  # noqa: E402
from tests.fixtures.demo_image import demo_spec_text  # noqa: E402
from tests.fixtures.slurm import running_slurm  # noqa: E402

CLI = str(Path(sys.executable).parent / "salvus_jobs")


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"salvus_jobs {' '.join(args)} failed: {r.stderr.strip()}")
    return r


def write_spec(work: Path, image, backend: str, site: str) -> Path:
    path = work / f"{site}.yaml"
    path.write_text(f"site: {site}\nscheduler: {{backend: {backend}}}\n"
                    + demo_spec_text(image, work / f"store-{site}"))
    return path


def submit_held_array(cluster, name: str, n: int) -> None:
    script = "#!/bin/sh\nexec sleep 3600\n"
    for start in range(0, n, 4000):
        end = min(n, start + 4000) - 1
        r = subprocess.run(["sbatch", "--parsable", "-H", f"--job-name={name}", f"--array={start}-{end}",
                            "--mem=10M"], input=script, capture_output=True, text=True,
                           env={**os.environ, **cluster.env}, timeout=120)
        if r.returncode != 0:
            raise SystemExit(f"sbatch: {r.stderr.strip()}")


def time_to_registered(spec_path: Path, timeout: float = 300) -> float:
    spec = load_spec(spec_path)
    t0 = time.monotonic()
    cli("--spec", str(spec_path), "scale", "sage=1")
    with open_registry(spec) as reg:
        while time.monotonic() - t0 < timeout:
            if reg.lookup("sage"):
                took = time.monotonic() - t0
                break
            time.sleep(0.1)
        else:
            raise SystemExit(f"{spec.scheduler.backend}: no VM registered within {timeout}s")
    cli("--spec", str(spec_path), "stop", "--all", timeout=180)
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--naive-sample", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="salvus-scale-bench-"))
    image = build_demo_image(work / "image")
    with running_slurm() as cluster:
        os.environ.update(cluster.env)
        spec_path = write_spec(work, image, "slurm", "bench")
        submit_held_array(cluster, "bench.sage", args.jobs)
        spec = load_spec(spec_path)
        jobs = open_backend(spec).list("sage")
        assert len(jobs) == args.jobs and all(j.state == "held" for j in jobs), (len(jobs), jobs[:2])

        cli_times, plan_times = [], []
        for _ in range(args.repeat):
            t0 = time.monotonic()
            out = cli("--spec", str(spec_path), "scale", "sage=10", "--dry-run").stdout
            cli_times.append(time.monotonic() - t0)
            t0 = time.monotonic()
            plan = plan_scale(spec, {"sage": 10})
            plan_times.append(time.monotonic() - t0)
        assert f"have {args.jobs}" in out and len(plan.roles[0].cancel) == args.jobs - 10

        sample = [j.job_id for j in jobs[:args.naive_sample]]
        t0 = time.monotonic()
        for job_id in sample:
            subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], capture_output=True,
                           check=True, env={**os.environ, **cluster.env})
        naive_per_job = (time.monotonic() - t0) / len(sample)
        cluster.cancel_all()
        # Let the controller finish with the 2,000 cancelled jobs before timing a new one.
        while cluster.run("squeue", "-h", "-t", "PD,R,CG", "-o", "%i").stdout.strip():
            time.sleep(0.5)
        time.sleep(3)

        print(f"planning against {args.jobs} held Slurm jobs (median of {args.repeat}):")
        print(f"  ours  (CLI scale --dry-run, one squeue + one scontrol): {statistics.median(cli_times):7.2f} s")
        print(f"  ours  (plan_scale in-process):                          {statistics.median(plan_times):7.2f} s")
        print(f"  naive (scontrol per job, {naive_per_job * 1000:.1f} ms each x {args.jobs}):      "
              f"{naive_per_job * args.jobs:7.2f} s (from a sample of {len(sample)})")

        slurm_s = time_to_registered(write_spec(work, image, "slurm", "one"))
    local_s = time_to_registered(write_spec(work, image, "local", "onelocal"))
    print("one VM, `scale sage=1` to registered:")
    print(f"  slurm (sbatch -> scheduled -> slurmd -> wrapper -> guest): {slurm_s:6.1f} s")
    print(f"  local executor:                                           {local_s:6.1f} s")
    print(f"plan_{args.jobs}_cli_s={statistics.median(cli_times):.2f} "
          f"plan_{args.jobs}_inproc_s={statistics.median(plan_times):.2f} "
          f"naive_{args.jobs}_s={naive_per_job * args.jobs:.1f} "
          f"slurm_to_registered_s={slurm_s:.1f} local_to_registered_s={local_s:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
