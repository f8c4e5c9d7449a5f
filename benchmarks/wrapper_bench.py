"""Wrapper benchmark: what salvus-vmjob costs on top of booting the same VM by hand.

1. Overhead: wrapper start -> registered, next to a plain `qemu-system-x86_64` start -> READY of the
   same image and config (sequential boots), and the wrapper's own READY -> registered time (probe +
   registry write), from its log.
2. Scale: `scale sage=N` on the local executor until N are registered, next to N plain QEMU boots
   started at once until all N said READY.
Real VMs (TCG here), so the figures move with the machine's load. Printed, not asserted; the last
line is `key=value` pairs.

    .venv/bin/python benchmarks/wrapper_bench.py [--runs 3] [--scale 8]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.registry import open_registry  # noqa: E402
from cluster.spec import ClusterSpec, load_spec  # noqa: E402
from catalogue.imagefile import open_image  # noqa: E402
from jobwrappers.accel import Accel, choose_accel  # noqa: E402
from jobwrappers.configdrive import GuestConfig, build_config_drive  # noqa: E402
from jobwrappers.demo_image import DemoImage, build_demo_image  # noqa: E402
from jobwrappers.disks import create_overlay  # noqa: E402
from jobwrappers.machine import Disk, Machine, free_port  # noqa: E402
from jobwrappers.probe import HostChannel  # noqa: E402
from jobwrappers.qemu_runner import QemuRunner  # noqa: E402

WRAPPER = str(Path(sys.executable).parent / "salvus-vmjob")
BOOT_TIMEOUT = 300.0


def write_spec(work: Path, image: DemoImage) -> ClusterSpec:
    path = work / "cluster.yaml"
    path.write_text(f"""\
store: {work}/store
registry: {{ttl: 10, heartbeat_interval: 2}}
hypervisor: {{libvirt: never, boot_timeout: {BOOT_TIMEOUT:.0f}, stop_timeout: 15}}
catalogue: {{insecure_allow_unsigned: true}}
roles:
  sage:
    image: demo@1
    image_path: {image.disk}
    boot: {{kernel: {image.kernel}, initrd: {image.initrd}}}
    memory_mb: 128
    port: 6000
    probe: {{send: "1+1\\n", expect: "2"}}
""")
    return load_spec(path)


def plain_boot(work: Path, image: DemoImage, spec: ClusterSpec, accel: Accel, n: int) -> QemuRunner:
    """Starts one plain QEMU guest of the same image and role config, as one would by hand."""
    role = spec.roles["sage"]
    d = Path(tempfile.mkdtemp(prefix=f"plain{n}-", dir=work))
    base = open_image(image.disk, "qcow2", None)  # stays open while the guest runs: QEMU reads it
    overlay = create_overlay(base, d / "root.qcow2")
    drive = build_config_drive(d / "cidata.iso", GuestConfig(f"plain-{n}", "sage", f"plain-{n}", role.port, f"p{n}"))
    m = Machine(name=f"plain-{n}", vcpus=1, memory_mb=role.memory_mb, accel=accel,
                disks=[Disk(overlay, "qcow2", backing=base), Disk(drive, "raw", readonly=True)], guest_port=role.port,
                host_addr="127.0.0.1", host_port=free_port(), channel_path=d / "ch.sock",
                console_log=d / "console.log", workdir=d, kernel=image.kernel, initrd=image.initrd,
                cmdline=role.boot.cmdline)
    runner = QemuRunner(m)
    runner.start()
    return runner


def wait_plain_ready(runners: list[QemuRunner]) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    for r in runners:
        ch = HostChannel(r.machine.channel_path)
        ch.wait_ready(deadline, r.alive)
        ch.close()


def stop_plain(runners: list[QemuRunner]) -> None:
    for r in runners:
        r.destroy()


def wrapper_boot(spec: ClusterSpec, sid: str, work: Path) -> tuple[float, float]:
    """Wrapper start -> registered (s), and the READY -> registered figure it logs."""
    err = work / f"{sid}.err"
    t0 = time.monotonic()
    with open(err, "w") as e:
        proc = subprocess.Popen([WRAPPER, "--spec", spec.source, "--role", "sage", "--service-id", sid],
                                stdout=subprocess.DEVNULL, stderr=e, env={**os.environ, "TMPDIR": str(work)})
    try:
        with open_registry(spec) as reg:
            while reg.get(sid) is None:
                if proc.poll() is not None or time.monotonic() - t0 > BOOT_TIMEOUT:
                    raise SystemExit(f"wrapper failed: {err.read_text()}")
                time.sleep(0.05)
        total = time.monotonic() - t0
    finally:
        proc.terminate()
        proc.wait(60)
    m = re.search(r"\(([\d.]+) s after READY\)", err.read_text())
    return total, float(m.group(1)) if m else float("nan")


def scale_wall_time(spec: ClusterSpec, n: int) -> float:
    from submit.scale import scale, stop_roles

    t0 = time.monotonic()
    scale(spec, {"sage": n})
    try:
        with open_registry(spec) as reg:
            while len(reg.lookup("sage")) < n:
                if time.monotonic() - t0 > BOOT_TIMEOUT * 2:
                    raise SystemExit("scale: not all registered in time")
                time.sleep(0.2)
        return time.monotonic() - t0
    finally:
        stop_roles(spec, ["sage"], wait=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="sequential boots per way for the overhead")
    ap.add_argument("--scale", type=int, default=8, help="VMs at once for the scale comparison (0: skip)")
    args = ap.parse_args()
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="wrapper-bench-") as tmp:
        work = Path(tmp)
        image = build_demo_image(work / "image")
        spec = write_spec(work, image)
        accel = choose_accel(spec.hypervisor.accel, spec.hypervisor.tcg)

        plain, wrapped, ready_to_reg = [], [], []
        for i in range(args.runs):
            t0 = time.monotonic()
            runner = plain_boot(work, image, spec, accel, i)
            wait_plain_ready([runner])
            plain.append(time.monotonic() - t0)
            stop_plain([runner])
            total, overhead = wrapper_boot(spec, f"sage-b{i}", work)
            wrapped.append(total)
            ready_to_reg.append(overhead)
        print(f"{'sequential boots':<34}{'median':>10}{'runs':>30}")
        print(f"{'plain qemu start -> READY':<34}{statistics.median(plain):>9.2f}s   "
              + " ".join(f"{x:.2f}" for x in plain))
        print(f"{'salvus-vmjob start -> registered':<34}{statistics.median(wrapped):>9.2f}s   "
              + " ".join(f"{x:.2f}" for x in wrapped))
        print(f"{'  of which READY -> registered':<34}{statistics.median(ready_to_reg):>9.3f}s   "
              + " ".join(f"{x:.3f}" for x in ready_to_reg))
        out.update(plain_boot_s=statistics.median(plain), wrapper_boot_s=statistics.median(wrapped),
                   ready_to_registered_ms=statistics.median(ready_to_reg) * 1000)

        if args.scale:
            t0 = time.monotonic()
            runners = [plain_boot(work, image, spec, accel, 100 + i) for i in range(args.scale)]
            try:
                wait_plain_ready(runners)
                plain_all = time.monotonic() - t0
            finally:
                stop_plain(runners)
            scaled = scale_wall_time(spec, args.scale)
            print(f"\n{args.scale} at once: plain qemu all READY {plain_all:.1f}s, "
                  f"`scale sage={args.scale}` all registered {scaled:.1f}s (ratio {scaled / plain_all:.2f})")
            out.update({f"plain_{args.scale}_s": plain_all, f"scale_{args.scale}_s": scaled,
                        "scale_ratio": scaled / plain_all})
    print(" ".join(f"{k}={v:.2f}" if not k.endswith("_ms") else f"{k}={v:.0f}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
