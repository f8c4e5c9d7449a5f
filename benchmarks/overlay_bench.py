"""Overlay benchmark: starting a VM's disk on a 1 GiB and on a 20 GiB base.

Our way (a qcow2 overlay backed by the base, `jobwrappers.disks.create_overlay`) next to the naive
way (copying the base into scratch, `cp --sparse=always`, the cheapest full copy) in the same run.
Each base is sparse with the same 64 MiB of real data, so the copy pays for data, not holes.
Figures are printed, not asserted; the last line is `key=value` pairs.

    .venv/bin/python benchmarks/overlay_bench.py [--runs 20]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from catalogue.imagefile import open_image  # noqa: E402
from jobwrappers.disks import create_overlay  # noqa: E402

DATA = "64M"


def make_base(path: Path, size: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0xab 0 {DATA}", str(path)],
                   check=True, capture_output=True)


def time_ms(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="overlay-bench-") as tmp:
        work = Path(tmp)
        print(f"{'base':>6}  {'overlay p50':>12}  {'overlay max':>12}  {'overlay size':>12}  {'copy p50':>10}")
        for label, size in (("1g", "1G"), ("20g", "20G")):
            base = work / f"base-{label}.qcow2"
            make_base(base, size)
            opened = open_image(base, "qcow2", None)  # as the wrapper has it: checked, open once
            create_overlay(opened, work / f"warmup-{label}.qcow2")  # page cache, qemu-img binary
            n = iter(range(10 ** 6))
            overlays = time_ms(lambda: create_overlay(opened, work / f"ov-{label}-{next(n)}.qcow2"), args.runs)
            opened.close()
            ov_size = (work / f"ov-{label}-0.qcow2").stat().st_size
            copies = time_ms(lambda: subprocess.run(
                ["cp", "--sparse=always", str(base), str(work / f"copy-{label}.qcow2")], check=True), 3)
            results[f"overlay_{label}_ms"] = statistics.median(overlays)
            results[f"copy_{label}_ms"] = statistics.median(copies)
            print(f"{size:>6}  {statistics.median(overlays):>10.1f}ms  {max(overlays):>10.1f}ms  "
                  f"{ov_size // 1024:>9} KiB  {statistics.median(copies):>8.1f}ms")
            for p in work.glob(f"*-{label}*.qcow2"):
                p.unlink()
    print(f"an overlay costs the same on any base; a copy pays for every byte of the base's data "
          f"({DATA} here, tens of GiB for a real image) and its disk space per job.")
    print(" ".join(f"{k}={v:.1f}" for k, v in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
