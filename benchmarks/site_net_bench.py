"""Site network benchmark: what the overlay costs, and what it refuses.

(a) Two hypervisors as network namespaces on a shaped underlay (a veth pair through a LAN bridge,
tc tbf at --rate): TCP throughput and round-trip time between the hosts directly (underlay
addresses), then between two "VM" namespaces behind the hosts' site bridges, across VXLAN and the
real filter (`network up`, and each VM port bound to its own anti-spoofing chain exactly as the
helper binds a tap). (b) Demo VMs (plain QEMU, TCG here): VM to VM across the overlay and VM to VM
on one bridge, bulk data over the guests' own nc, started through `salvus_jobs ssh` (two VMs at
a time: two on host 1, then the second replaced by one on host 2). (c) Forbidden
connection attempts (a sage-block address to a cassandra's port, which only cassandra and hub may
reach): how many were refused. Figures are printed, not asserted; the last line is key=value pairs:

    ns_direct_mbit=… ns_overlay_mbit=… ns_ratio=… vm_bridge_mbit=… vm_overlay_mbit=… vm_ratio=…
    rtt_direct_ms=… rtt_overlay_ms=… refused=K/K

    .venv/bin/python benchmarks/site_net_bench.py [--rate 200mbit] [--seconds 5] [--no-vms]
(root; only namespaces and addresses it makes: 198.18.9.0/24, 10.78.0.0/16; all removed at the end)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster.spec import load_spec  # noqa: E402
from jobwrappers.demo_image import build_demo_image  # noqa: E402
from jobwrappers.sitenet import rules  # noqa: E402
from jobwrappers.sitenet.layout import SiteLayout, mac_for  # noqa: E402
from tests.fixtures.site_lab import BIN, Site, site_spec_text, sh  # noqa: E402
from tests.guest_ssh import new_key, spec_line  # noqa: E402

PORT = 5201
# Runs in a namespace: a receiver counting bytes until the sender closes, or a sender for N seconds;
# or an echo server and a client timing 1-byte round trips.
TOOL = r"""
import socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "sink":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, port)); s.listen(1)
    print("ready", flush=True)
    c, _ = s.accept(); n = 0; t0 = time.monotonic()
    while b := c.recv(1 << 16): n += len(b)
    print(n, time.monotonic() - t0, flush=True)
elif mode == "send":
    c = socket.create_connection((host, port), timeout=10); buf = b"\0" * (1 << 16); end = time.monotonic() + float(sys.argv[4])
    while time.monotonic() < end: c.sendall(buf)
    c.close()
elif mode == "echo":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, port)); s.listen(1)
    print("ready", flush=True)
    c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while b := c.recv(1): c.sendall(b)
elif mode == "ping":
    c = socket.create_connection((host, port), timeout=10); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(int(sys.argv[4])):
        t0 = time.monotonic(); c.sendall(b"x"); c.recv(1); rtts.append(time.monotonic() - t0)
    print(sorted(rtts)[len(rtts) // 2] * 1000, flush=True)
elif mode == "try":
    ok = 0
    for _ in range(int(sys.argv[4])):
        try:
            socket.create_connection((host, port), timeout=0.5).close(); ok += 1
        except OSError:
            pass
    print(ok, flush=True)
"""


def ns_run(ns: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", TOOL, *args],
                            stdout=subprocess.PIPE, text=True, **kw)


def throughput(src: str, dst: str, addr: str, seconds: float) -> float:
    sink = ns_run(dst, "sink", addr, str(PORT))
    assert sink.stdout.readline().strip() == "ready"
    subprocess.run(["ip", "netns", "exec", src, sys.executable, "-c", TOOL, "send", addr, str(PORT), str(seconds)],
                   check=True)
    n, elapsed = sink.stdout.readline().split()
    sink.wait(10)
    return int(n) * 8 / float(elapsed) / 1e6


def rtt(src: str, dst: str, addr: str, rounds: int = 200) -> float:
    echo = ns_run(dst, "echo", addr, str(PORT + 1))
    assert echo.stdout.readline().strip() == "ready"
    out = subprocess.run(["ip", "netns", "exec", src, sys.executable, "-c", TOOL, "ping", addr, str(PORT + 1),
                          str(rounds)], check=True, capture_output=True, text=True).stdout
    echo.wait(10)
    return float(out)


def add_vm_ns(site: Site, host: int, name: str, ip: str, prefixlen: int, mtu: int) -> str:
    """A namespace on host `host`'s bridge, filtered as a VM with address `ip` would be."""
    ns = f"{site.prefix}-{name}"
    sh("ip", "netns", "add", ns)
    site.made.append(ns)
    outer = f"{site.prefix[-5:]}{name}"[:15]
    sh("ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "link", "set", outer, "netns", site.ns(host))
    sh("ip", "-n", ns, "link", "set", "eth0", "address", mac_for(ip), "mtu", str(mtu))
    sh("ip", "-n", ns, "addr", "add", f"{ip}/{prefixlen}", "dev", "eth0")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", site.ns(host), "link", "set", outer, "master", "salvusbr0", "mtu", str(mtu), "up")
    site.run_in(host, "nft", "-f", "-", input=rules.attach_rules(outer, ip, mac_for(ip)), check=True)
    return ns


def shape(site: Site, rate: str) -> None:
    for i in (1, 2):
        for where, dev in ((site.ns(i), "eth0"), (site.lan, f"{site.prefix}b{i}")):
            sh("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
               "burst", "64kb", "latency", "50ms")


def vm_mbit(site: Site, spec: Path, src, dst, count: int) -> float:
    """`dd | nc` from VM `src` to a sink `nc -l` in VM `dst` (both started over `salvus_jobs ssh`),
    timed by the sending guest's /proc/uptime around the transfer: the ssh sessions' own set-up
    (seconds under TCG, and varying) is not in the figure."""
    def ssh(svc, command: str, timeout: float = 300) -> subprocess.CompletedProcess:
        host = int(svc.hypervisor[1:])
        return site.run_in(host, str(BIN / "salvus_jobs"), "ssh", svc.service_id, "--spec", str(spec), "-l", "root",
                           "-i", str(site.key_file), "-n", "--", command, timeout=timeout)
    # The sink's stdin must not end: busybox nc half-closes on its stdin's EOF, and the sender
    # quits when its peer half-closes, after a few KiB.
    ssh(dst, "rm -f /tmp/got; (sleep 600 | nc -l -p 7001 2>/dev/null | wc -c >/tmp/got &) ; sleep 0.5")
    proc = ssh(src, "a=$(cut -d' ' -f1 /proc/uptime); "
                    f"dd if=/dev/zero bs=65536 count={count} 2>/dev/null | nc {dst.host} 7001 || echo nc failed $?; "
                    "b=$(cut -d' ' -f1 /proc/uptime); echo $a $b")
    assert proc.returncode == 0 and "nc failed" not in proc.stdout, proc.stdout + proc.stderr
    got = ssh(dst, "sleep 0.5; cat /tmp/got").stdout.split()
    assert got == [str(count * 65536)], f"{dst.service_id} received {got} of {count * 65536} bytes"
    start, end = (float(x) for x in proc.stdout.split()[-2:])
    return count * 65536 * 8 / max(end - start, 0.01) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", default="200mbit", help="the underlay's shaped rate (tc tbf)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--attempts", type=int, default=20, help="forbidden connection attempts")
    ap.add_argument("--no-vms", action="store_true", help="skip (b), the demo VMs")
    ap.add_argument("--vm-mib", type=int, default=32)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("site_net_bench: run as root (it makes network namespaces)", file=sys.stderr)
        return 78
    tmp = Path(tempfile.mkdtemp(prefix="site-net-bench-"))
    image = build_demo_image(tmp / "image")
    key_file = tmp / "guest_key"
    spec_path = tmp / "cluster.yaml"
    spec_path.write_text(site_spec_text(image, tmp / "store", ssh_key=spec_line(new_key(key_file)),
                                        cassandra_config="{}"))
    site = Site(tmp, f"snb{os.getpid() % 10000}", image, spec_path, key_file,
                {**os.environ, "SALVUS_NET_DIR": str(tmp / "net")})
    out: dict[str, str] = {}
    print("load average (1, 5, 15 min) at the start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    try:
        site.create()
        shape(site, args.rate)
        for i in (1, 2, 3):
            assert site.network(i).returncode == 0
        spec = load_spec(spec_path)
        layout = SiteLayout(spec)
        h1, h2 = layout.host("h1"), layout.host("h2")
        direct = throughput(site.ns(1), site.ns(2), "198.18.9.2", args.seconds)
        rtt_direct = rtt(site.ns(1), site.ns(2), "198.18.9.2")
        cas = [str(layout.slots("cassandra", h)[-1]) for h in (h1, h2)]
        va = add_vm_ns(site, 1, "va", cas[0], layout.prefixlen, layout.net.mtu)
        vb = add_vm_ns(site, 2, "vb", cas[1], layout.prefixlen, layout.net.mtu)
        overlay = throughput(va, vb, cas[1], args.seconds)
        rtt_overlay = rtt(va, vb, cas[1])
        print(f"(a) {args.rate} underlay: direct {direct:.0f} Mbit/s rtt {rtt_direct:.3f} ms; "
              f"VM port to VM port over bridge+VXLAN+filter {overlay:.0f} Mbit/s rtt {rtt_overlay:.3f} ms")
        # (c) a sage-block address on host 1 tries the cassandra on host 2: only cassandra and hub may.
        vs = add_vm_ns(site, 1, "vs", str(layout.slots("sage", h1)[-1]), layout.prefixlen, layout.net.mtu)
        sink = ns_run(vb, "echo", cas[1], "9042")
        assert sink.stdout.readline().strip() == "ready"
        got = int(subprocess.run(["ip", "netns", "exec", vs, sys.executable, "-c", TOOL, "try", cas[1], "9042",
                                  str(args.attempts)], check=True, capture_output=True, text=True).stdout)
        sink.kill()
        print(f"(c) {args.attempts - got} of {args.attempts} forbidden connections refused")
        out.update(ns_direct_mbit=f"{direct:.0f}", ns_overlay_mbit=f"{overlay:.0f}",
                   ns_ratio=f"{overlay / direct:.2f}", rtt_direct_ms=f"{rtt_direct:.3f}",
                   rtt_overlay_ms=f"{rtt_overlay:.3f}", refused=f"{args.attempts - got}/{args.attempts}")
        if not args.no_vms:
            # Two VMs at a time (the machine is shared): A and B on host 1's bridge, then B gone
            # and C on host 2, so A's second transfer crosses the overlay.
            count = args.vm_mib * 16
            run_b = site.wrapper(1, "cassandra", "bench-b")
            a, b = site.wrapper(1, "cassandra", "bench-a").registered(), run_b.registered()
            bridge = vm_mbit(site, spec_path, a, b, count)
            run_b.terminate()
            c = site.wrapper(2, "cassandra", "bench-c").registered()
            over = vm_mbit(site, spec_path, a, c, count)
            print(f"(b) VM to VM, {args.vm_mib} MiB: on one bridge {bridge:.0f} Mbit/s, across the overlay "
                  f"{over:.0f} Mbit/s (TCG guests: the guests' CPU bounds both)")
            out.update(vm_bridge_mbit=f"{bridge:.0f}", vm_overlay_mbit=f"{over:.0f}", vm_ratio=f"{over / bridge:.2f}")
    finally:
        site.stop_wrappers()
        for i in (1, 2, 3):
            if site.ns(i) in site.made:
                site.network(i, "down")
        site.delete()
    keys = ("ns_direct_mbit", "ns_overlay_mbit", "ns_ratio", "vm_bridge_mbit", "vm_overlay_mbit", "vm_ratio",
            "rtt_direct_ms", "rtt_overlay_ms", "refused")
    # The machine may be shared: what else loaded it is part of reading the figures.
    print("load average (1, 5, 15 min) at the end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(" ".join(f"{k}={out.get(k, '-')}" for k in keys))
    print(json.dumps(out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
