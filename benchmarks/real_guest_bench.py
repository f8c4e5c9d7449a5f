"""Real-guest benchmark: the Debian 12 cloud-init image (jobwrappers/debian_image.py) booted by hand
and as a job, and the emulator settings it boots fastest under.

1. Plain `qemu-system-x86_64` start -> sshd answers (its "SSH-" banner on the forwarded port 22),
   next to `salvus-vmjob` start -> registered: same image, kernel, config drive contents, memory and
   CPUs (role port 22, probe expect "SSH-"), sequential, medians of `--runs`. In the wrapper runs also
   sshd answered (this script polls the forwarded port beside the wrapper) -> registered, the
   wrapper's READY -> registered (from its log: the probe waits for sshd's first banner, which sshd
   under TCG takes seconds to send), and SIGTERM -> "guest shut down in" (a clean ACPI power-off).
2. `--tcg CPU/TB,...`: plain start -> sshd answers for each CPU model and translation-cache size
   (one boot each per run) — what `hypervisor.tcg`'s defaults are chosen from. Skipped under KVM.
3. `--firmware`: plain start -> sshd answers for the same kernel, initrd and root filesystem booted
   four ways: direct kernel boot of the compressed base (as in 1), the same with an uncompressed copy
   of the base, and the whole disk (`img.whole_disk`) by SeaBIOS + syslinux and by OVMF + systemd-boot.
   With each, start -> the kernel's first console line: the firmware and bootloader's own share,
   less moved by load than the whole boot. `--runs 0 --firmware` runs only these.
Real VMs, so the figures move with the machine's load: run it on a quiet machine. Printed, not
asserted; the last line is `key=value` pairs.

    .venv/bin/python benchmarks/real_guest_bench.py [--runs 3] [--tcg max/16,qemu64/16,qemu64/64 [--tcg-runs 1]]
        [--firmware [--firmware-runs 1]]
"""
from __future__ import annotations

import argparse
import io
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paramiko  # noqa: E402

from catalogue.imagefile import open_image  # noqa: E402
from cluster.registry import open_registry  # noqa: E402
from cluster.spec import ClusterSpec, load_spec  # noqa: E402
from jobwrappers import debian_image  # noqa: E402
from jobwrappers.accel import Accel, choose_accel, tcg  # noqa: E402
from jobwrappers.configdrive import GuestConfig, build_config_drive  # noqa: E402
from jobwrappers.disks import create_overlay  # noqa: E402
from jobwrappers.firmware import prepare_firmware  # noqa: E402
from jobwrappers.machine import Disk, Machine, free_port  # noqa: E402
from jobwrappers.qemu_runner import QemuRunner  # noqa: E402

WRAPPER = str(Path(sys.executable).parent / "salvus-vmjob")
BOOT_TIMEOUT = 900.0
STOP_TIMEOUT = 120


def write_spec(work: Path, img: debian_image.DebianImage, ssh_key: str) -> ClusterSpec:
    path = work / "cluster.yaml"
    path.write_text(f"""\
store: {work}/store
registry: {{ttl: 30, heartbeat_interval: 2}}
hypervisor: {{libvirt: never}}
catalogue: {{insecure_allow_unsigned: true}}
ssh_keys: ["{ssh_key}"]
roles:
  sage:
    image: debian@12
    image_path: {img.disk}
    boot: {{kernel: {img.kernel}, initrd: {img.initrd}, cmdline: "{img.cmdline}"}}
    vcpus: 2
    memory_mb: 1024
    port: 22
    boot_timeout: {BOOT_TIMEOUT:.0f}
    stop_timeout: {STOP_TIMEOUT}
    probe: {{expect: "SSH-", timeout: 30}}
""" + "".join(f"""\
  {role}:
    image: debian-disk@12
    image_path: {img.whole_disk}
    firmware: {fw}
    vcpus: 2
    memory_mb: 1024
    port: 22
""" for role, fw in (("legacy", "bios"), ("uefi", "uefi"))))
    return load_spec(path)


def sshd_answers(port: int, until: float) -> float | None:
    """Polls 127.0.0.1:port until sshd sends its banner; the monotonic time it did, or None."""
    while time.monotonic() < until:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(30)
                if s.recv(4).startswith(b"SSH-"):
                    return time.monotonic()
        except OSError:
            pass
        time.sleep(0.2)
    return None


def plain_boot(work: Path, img: debian_image.DebianImage, spec: ClusterSpec, accel: Accel, n: int,
               role_name: str = "sage", disk: Path | None = None) -> float:
    """One plain QEMU boot of the role's image (or `disk`) with the same config drive a job gets,
    by direct boot or the role's firmware: start -> sshd answers."""
    role = spec.roles[role_name]
    d = Path(tempfile.mkdtemp(prefix=f"plain{n}-", dir=work))
    base = open_image(disk or Path(role.image_path), "qcow2", None)  # open while the guest runs: QEMU reads it
    overlay = create_overlay(base, d / "root.qcow2")
    cfg = GuestConfig(f"plain-{n}", "sage", f"plain-{n}", role.port, f"p{n}", ssh_keys=list(spec.ssh_keys))
    drive = build_config_drive(d / "cidata.iso", cfg)
    port = free_port()
    m = Machine(name=f"plain-{n}", vcpus=role.vcpus, memory_mb=role.memory_mb, accel=accel,
                disks=[Disk(overlay, "qcow2", backing=base), Disk(drive, "raw", readonly=True)],
                guest_port=role.port, host_addr="127.0.0.1", host_port=port, channel_path=d / "ch.sock",
                console_log=d / "console.log", workdir=d, firmware=prepare_firmware(spec, role_name, d),
                **({"kernel": img.kernel, "initrd": img.initrd, "cmdline": role.boot.cmdline} if role.boot else {}))
    runner = QemuRunner(m)
    t0 = time.monotonic()
    runner.start()
    kernel: list[float] = []
    watcher = threading.Thread(target=lambda: kernel.append(console_shows(m.console_log, b"Linux version",
                                                                          t0 + BOOT_TIMEOUT)), daemon=True)
    watcher.start()
    try:
        answered = sshd_answers(port, t0 + BOOT_TIMEOUT)
    finally:
        runner.destroy()
    if answered is None:
        raise SystemExit(f"plain boot {n}: sshd never answered; see {d / 'console.log'}")
    watcher.join(5)
    KERNEL_STARTS.append(kernel[0] - t0 if kernel and kernel[0] else float("nan"))
    return answered - t0


# start -> the kernel's first console line, per plain_boot (the firmware and bootloader's share).
KERNEL_STARTS: list[float] = []


def console_shows(log: Path, marker: bytes, until: float) -> float | None:
    """Polls the console log until `marker` appears; the monotonic time it was seen, or None."""
    while time.monotonic() < until:
        try:
            if marker in log.read_bytes():
                return time.monotonic()
        except OSError:
            pass
        time.sleep(0.05)
    return None


def wrapper_boot(spec: ClusterSpec, sid: str, work: Path) -> dict[str, float]:
    """Wrapper start -> registered, sshd answered -> registered, READY -> registered, SIGTERM -> off."""
    err = work / f"{sid}.err"
    t0 = time.monotonic()
    with open(err, "w") as e:
        proc = subprocess.Popen([WRAPPER, "--spec", spec.source, "--role", "sage", "--service-id", sid],
                                stdout=e, stderr=e, env={**os.environ, "TMPDIR": str(work)})
    answered: list[float | None] = []
    try:
        with open_registry(spec) as reg:
            while not (port := _endpoint_port(err)):  # the wrapper prints its endpoint at start
                if proc.poll() is not None or time.monotonic() - t0 > BOOT_TIMEOUT:
                    raise SystemExit(f"wrapper failed: {err.read_text()}")
                time.sleep(0.05)
            # Beside the wrapper, as an operator would: poll the forwarded port for sshd's banner.
            watcher = threading.Thread(target=lambda: answered.append(sshd_answers(port, t0 + BOOT_TIMEOUT)))
            watcher.start()
            while (svc := reg.get(sid)) is None:
                if proc.poll() is not None or time.monotonic() - t0 > BOOT_TIMEOUT:
                    raise SystemExit(f"wrapper failed: {err.read_text()}")
                time.sleep(0.05)
            registered = time.monotonic()
            watcher.join()
        assert svc.port == port
    finally:
        proc.terminate()
        proc.wait(STOP_TIMEOUT + 60)
        if proc.returncode:
            print(err.read_text(), file=sys.stderr)
    log = err.read_text()
    ready = re.search(r"\(([\d.]+) s after READY\)", log)
    stop = re.search(r"guest (shut down|destroyed after stop_timeout) in ([\d.]+) s", log)
    return {"registered_s": registered - t0,
            "ssh_to_registered_s": registered - answered[0] if answered and answered[0] else float("nan"),
            "ready_to_registered_s": float(ready.group(1)) if ready else float("nan"),
            "stop_s": float(stop.group(2)) if stop and stop.group(1) == "shut down" else float("nan")}


def _endpoint_port(err: Path) -> int:
    m = re.search(r"endpoint 127\.0\.0\.1:(\d+)", err.read_text())
    return int(m.group(1)) if m else 0


def _row(label: str, values: list[float], unit: str = "s", digits: int = 1) -> str:
    return (f"{label:<38}{statistics.median(values):>9.{digits}f}{unit}   "
            + " ".join(f"{v:.{digits}f}" for v in values))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="sequential boots per way (default 3)")
    ap.add_argument("--tcg", default="", metavar="CPU/TB,...",
                    help="also time plain boots under these TCG CPU models / cache MiB, e.g. max/16,qemu64/16")
    ap.add_argument("--tcg-runs", type=int, default=1, help="boots per --tcg setting (default 1)")
    ap.add_argument("--firmware", action="store_true",
                    help="also time direct boot (compressed, uncompressed base) against BIOS and UEFI firmware boot")
    ap.add_argument("--firmware-runs", type=int, default=1, help="boots per --firmware way (default 1)")
    args = ap.parse_args()
    img = debian_image.build()
    pub = _ed25519_pub()  # the config drive installs it, as a job's would; nothing logs in with it
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="real-guest-bench-") as tmp:
        work = Path(tmp)
        spec = write_spec(work, img, pub)
        accel = choose_accel(spec.hypervisor.accel, spec.hypervisor.tcg)
        med = statistics.median
        if args.runs > 0:
            out.update(wrapper_runs(work, img, spec, accel, args.runs))
        if args.firmware:
            out.update(firmware_runs(work, img, spec, accel, args.firmware_runs))
        if args.tcg and accel.name == "tcg":
            print("\nplain qemu start -> sshd answers, per TCG setting")
            for n, setting in enumerate(args.tcg.split(",")):
                cpu, _, tb = setting.partition("/")
                times = [plain_boot(work, img, spec, tcg(cpu, int(tb or 16)), 100 + n * 10 + r) for r in range(args.tcg_runs)]
                print(_row(f"  -cpu {cpu}, tb-size={tb or 16}", times), flush=True)
                out[f"tcg_{cpu}_{tb or 16}_s"] = med(times)
    print(" ".join(f"{k}={v:.0f}" if k.endswith("_ms") else f"{k}={v:.2f}" for k, v in out.items()))
    return 0


def wrapper_runs(work: Path, img: debian_image.DebianImage, spec: ClusterSpec, accel: Accel,
                 runs: int) -> dict[str, float]:
    """Part 1: plain start -> sshd answers beside wrapper start -> registered, `runs` of each."""
    plain, wrapped = [], []
    for i in range(runs):
        plain.append(plain_boot(work, img, spec, accel, i))
        wrapped.append(wrapper_boot(spec, f"sage-b{i}", work))
        print(f"run {i + 1}: plain {plain[-1]:.1f} s, wrapper {wrapped[-1]}", flush=True)
    col = {k: [w[k] for w in wrapped] for k in wrapped[0]}
    print(f"\n{accel.name}, {' '.join(accel.qemu_args)}; {runs} sequential boots per way")
    print(f"{'':<38}{'median':>10}   runs")
    print(_row("plain qemu start -> sshd answers", plain))
    print(_row("salvus-vmjob start -> registered", col["registered_s"]))
    print(_row("  sshd answered -> registered", col["ssh_to_registered_s"], digits=2))
    print(_row("  READY -> registered (sshd's banner)", col["ready_to_registered_s"], digits=2))
    print(_row("SIGTERM -> guest shut down (ACPI)", col["stop_s"]))
    med = statistics.median
    return dict(plain_ssh_s=med(plain), wrapper_registered_s=med(col["registered_s"]),
                ratio=med(col["registered_s"]) / med(plain), ssh_to_registered_s=med(col["ssh_to_registered_s"]),
                ready_to_registered_ms=med(col["ready_to_registered_s"]) * 1000, clean_stop_s=med(col["stop_s"]))


def firmware_runs(work: Path, img: debian_image.DebianImage, spec: ClusterSpec, accel: Accel,
                  runs: int) -> dict[str, float]:
    """Part 3: the same kernel and root filesystem by direct boot (compressed and uncompressed base)
    and by BIOS and UEFI firmware from the whole disk, one after another, `runs` each."""
    raw_base = work / "debian12-uncompressed.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(img.disk), str(raw_base)], check=True)
    ways = {"direct_s": ("sage", None), "direct_uncompressed_s": ("sage", raw_base),
            "bios_s": ("legacy", None), "uefi_s": ("uefi", None)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    kernel: dict[str, list[float]] = {k: [] for k in ways}
    for r in range(runs):
        for n, (key, (role, disk)) in enumerate(ways.items()):
            times[key].append(plain_boot(work, img, spec, accel, 200 + r * 10 + n, role, disk))
            kernel[key].append(KERNEL_STARTS[-1])
            print(f"firmware run {r + 1}: {key} {times[key][-1]:.1f} s (kernel's first line at "
                  f"{kernel[key][-1]:.1f} s)", flush=True)
    sizes = {p.name: p.stat().st_size >> 20 for p in (img.disk, raw_base, img.whole_disk)}
    print(f"\nplain qemu start -> sshd answers, same kernel and root filesystem; files {sizes} MiB")
    print(_row("  direct kernel boot (compressed base)", times["direct_s"]))
    print(_row("  direct kernel boot (uncompressed base)", times["direct_uncompressed_s"]))
    print(_row("  SeaBIOS -> syslinux -> kernel", times["bios_s"]))
    print(_row("  OVMF -> systemd-boot -> kernel", times["uefi_s"]))
    print("plain qemu start -> the kernel's first console line (firmware + bootloader)")
    for key, label in (("direct_s", "direct"), ("bios_s", "SeaBIOS + syslinux"), ("uefi_s", "OVMF + systemd-boot")):
        print(_row(f"  {label}", kernel[key]))
    out = {k: statistics.median(v) for k, v in times.items()}
    out.update({f"{k[:-2]}_kernel_s": statistics.median(kernel[k]) for k in ("direct_s", "bios_s", "uefi_s")})
    return out


def _ed25519_pub() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    k = paramiko.Ed25519Key.from_private_key(io.StringIO(pem.decode()))
    return f"{k.get_name()} {k.get_base64()} bench"


if __name__ == "__main__":
    sys.exit(main())
