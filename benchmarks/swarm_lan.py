"""Swarm vs plain HTTP on an emulated LAN: origin + 8 hypervisors, 100 Mbit/s links (run as root).

The LAN is network namespaces this script creates and deletes: one holding a bridge, one per node,
veth pairs shaped with `tbf rate 100mbit` on both ends, addresses from the benchmarking range
198.18.0.0/24 that exist only inside those namespaces. The origin runs the catalogue's HTTP server
(index, torrents, web seed) and `imgdist --origin` (seeder + tracker, paced per host); every host
runs `imgdist --daemon` with the site's host list (steering: striped priorities, origin gated once
a host's slice is done). Then, in the same run, every host fetches the same image with plain HTTP
(`curl`, then `sha256sum`, as a naive script would). The imgdist daemons run before the clock
starts, as deployed; it starts when the image is approved and they are reloaded (SIGHUP).

    sudo .venv/bin/python benchmarks/swarm_lan.py [--size-mib 256] [--hosts 8]

Figures: wall time of each way (until the last host has the verified image), their ratio, the swarm
time as a fraction of the per-host link limit (size / 100 Mbit/s), and the origin's egress in
image copies (bytes sent on its link / image size). The last line is key=value pairs. Each way also
reports how busy the machine's CPUs were and how much of their time the hypervisor gave to other
guests (steal): the LAN is emulated on this machine's CPUs, so steal slows it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.netlab import join_lan  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
MiB = 1 << 20
LINK_BITS = 100_000_000
SUBNET = "198.18.0"
ORIGIN_IP = f"{SUBNET}.1"
HTTP_PORT = 8765
TRACKER_PORT = 6969
BT_PORT = 6881
PASSPHRASE = b"swarm-bench"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


@dataclass
class Lan:
    """The namespaces, veths and shaping; everything it makes, `delete` removes."""

    prefix: str
    hosts: int
    made: list[str] = field(default_factory=list)

    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}-br"

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def ip(self, node: str) -> str:
        return ORIGIN_IP if node == "o" else f"{SUBNET}.{11 + int(node[1:])}"

    def nodes(self) -> list[str]:
        return ["o"] + [f"h{i}" for i in range(self.hosts)]

    def create(self) -> None:
        sh("ip", "netns", "add", self.bridge_ns)
        self.made.append(self.bridge_ns)
        sh("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, node in enumerate(self.nodes()):
            ns = self.ns(node)
            self.made.append(ns)
            outer, inner = f"{self.prefix[-6:]}b{i}", f"{self.prefix[-6:]}n{i}"
            join_lan(self.bridge_ns, "br0", ns, outer, inner, f"{self.ip(node)}/24")
            # Both directions of every link: a node's upload (eth0) and its download (outer end).
            for where, dev in ((ns, "eth0"), (self.bridge_ns, outer)):
                sh("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                   "rate", "100mbit", "burst", "64kb", "latency", "50ms")

    def delete(self) -> None:
        for ns in reversed(self.made):
            sh("ip", "netns", "del", ns, check=False)
        self.made.clear()

    def bridge_side_bytes(self) -> dict[str, tuple[int, int]]:
        """node -> (bytes sent to it, bytes it sent), from the bridge ends of the veths."""
        out = sh("ip", "-n", self.bridge_ns, "-s", "-j", "link", "show").stdout
        by_dev = {d["ifname"]: d["stats64"] for d in json.loads(out)}
        res = {}
        for i, node in enumerate(self.nodes()):
            st = by_dev[f"{self.prefix[-6:]}b{i}"]
            res[node] = (int(st["tx"]["bytes"]), int(st["rx"]["bytes"]))
        return res

    def tcp_segments(self, node: str) -> dict[str, int]:
        """The node's TCP counters (OutSegs, RetransSegs, ...) from its namespace's /proc."""
        lines = sh("ip", "netns", "exec", self.ns(node), "cat", "/proc/net/snmp").stdout.splitlines()
        tcp = [line.split()[1:] for line in lines if line.startswith("Tcp:")]
        return {k: int(v) for k, v in zip(tcp[0], tcp[1])}

    def tbf_stats(self, node: str, uplink: bool = True) -> dict:
        """The shaping qdisc of a node's uplink (its eth0) or downlink (the bridge end): bytes and
        packets it sent, packets it dropped."""
        i = self.nodes().index(node)
        where, dev = (self.ns(node), "eth0") if uplink else (self.bridge_ns, f"{self.prefix[-6:]}b{i}")
        return json.loads(sh("ip", "netns", "exec", where, "tc", "-s", "-j", "qdisc", "show", "dev", dev).stdout)[0]

    def tbf_drops(self) -> dict[str, tuple[int, int]]:
        """node -> (packets its uplink's tbf dropped, packets its downlink's tbf dropped)."""
        return {node: (int(self.tbf_stats(node)["drops"]), int(self.tbf_stats(node, uplink=False)["drops"]))
                for node in self.nodes()}

    def sent_bytes(self, node: str) -> int:
        """Bytes on the node's uplink, counted by its tbf: every segment with its own headers. (The
        veth counters count a GSO packet's headers once: 1% under the payload on one TCP flow.)"""
        return int(self.tbf_stats(node)["bytes"])


@dataclass
class Procs:
    """Processes this benchmark started (each its own process group), stopped by pid."""

    running: list[subprocess.Popen] = field(default_factory=list)

    def start(self, lan: Lan, node: str, args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", lan.ns(node), *args], stdout=open(log, "wb"),
                             stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})})
        self.running.append(p)
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 20) -> None:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def stop_all(self) -> None:
        for p in self.running:
            self.stop(p)


def make_catalogue(work: Path, size_mib: int):
    """A signed catalogue with one random-data qcow2 image, via the catalogue's own code."""
    from datetime import timedelta

    from catalogue.endorse import CatalogueDir, add_image, sign_index
    from catalogue.keys import generate_key, load_private_key

    raw, image = work / "image.raw", work / "bench.qcow2"
    with open(raw, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(MiB))
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    raw.unlink()
    key = work / "endorser.key"
    generate_key(key, PASSPHRASE)
    cat = CatalogueDir(work / "catalogue")
    entry = add_image(cat, image, "bench", "1", [], [], f"http://{ORIGIN_IP}:{HTTP_PORT}/")
    image.unlink()
    sign_index(cat, load_private_key(key, PASSPHRASE), timedelta(days=1))
    return entry, key


def write_spec(path: Path, store: Path, key: Path, lan: Lan, me: str, origin_rate: int) -> None:
    hosts = [lan.ip(n) for n in lan.nodes() if n != "o"]
    path.write_text(
        f"store: {store}\n"
        "roles: {sage: {image: bench@1, port: 6000}}\n"
        f"hypervisor: {{advertise_host: '{lan.ip(me)}', hosts: {json.dumps(hosts)}}}\n"
        f"catalogue: {{url: 'http://{ORIGIN_IP}:{HTTP_PORT}/', trust: {{keys: ['{key}.pub']}}}}\n"
        f"imgdist: {{listen_port: {BT_PORT}, tracker: 'http://{ORIGIN_IP}:{TRACKER_PORT}/announce', "
        f"origin_upload_rate: {origin_rate}, stall_timeout: 60, reserve_mb: 1}}\n")


def wait_for(paths: dict[str, Path], procs: dict[str, subprocess.Popen], t0: float, timeout: float) -> dict[str, float]:
    done: dict[str, float] = {}
    while len(done) < len(paths) and time.monotonic() - t0 < timeout:
        for node, path in paths.items():
            if node not in done and path.exists():
                done[node] = time.monotonic() - t0
            if node not in done and procs[node].poll() is not None:
                raise RuntimeError(f"{node}: exited with {procs[node].returncode} before finishing")
        time.sleep(0.05)
    if len(done) < len(paths):
        raise RuntimeError(f"timed out after {timeout:.0f} s; done: {sorted(done)}")
    return done


def run_swarm(lan: Lan, procs: Procs, work: Path, entry, key: Path, origin_rate: int) -> tuple[float, int, dict]:
    """Daemons start as deployed (the image endorsed but not yet approved: they idle); the clock
    starts when the site approves it and reloads them (SIGHUP), as the curls start below."""
    from catalogue.approvals import approve
    from cluster.spec import load_spec

    specs = {}
    for node in lan.nodes():
        d = work / node
        d.mkdir(exist_ok=True)
        spec = d / "cluster.yaml"
        write_spec(spec, d / "store", key, lan, node, origin_rate)
        specs[node] = spec
    imgdist = str(VENV_BIN / "imgdist")
    procs.start(lan, "o", [imgdist, "--spec", str(specs["o"]), "--origin", str(work / "catalogue"),
                           "--tracker-port", str(TRACKER_PORT)], work / "o" / "origin.log")
    time.sleep(2)  # the tracker and seeder up before the hosts announce
    hosts = {n: procs.start(lan, n, [imgdist, "--spec", str(specs[n]), "--daemon", "--interval", "3600"],
                            work / n / "imgdist.log") for n in lan.nodes() if n != "o"}
    idle = {n: work / n / "store" / "state" / "imgdist-status.json" for n in hosts}
    wait_for(idle, hosts, time.monotonic(), timeout=120)
    for n in hosts:
        approve(load_spec(specs[n]), "bench@1")
    tx0 = lan.sent_bytes("o")
    tcp0 = lan.tcp_segments("o")
    drops0 = lan.tbf_drops()
    cpu0 = sum(cpu_seconds(p.pid) for p in hosts.values())
    machine0 = machine_cpu()
    t0 = time.monotonic()
    for p in hosts.values():
        os.killpg(p.pid, signal.SIGHUP)
    targets = {n: work / n / "store" / "images" / "base" / entry.file_name for n in hosts}
    sampler = LinkSampler(lan)
    sampler.start()
    try:
        done = wait_for(targets, hosts, t0, timeout=900)
    finally:
        sampler.stop()
    wall = max(done.values())
    machine = cpu_report(machine0, machine_cpu())
    sent = lan.sent_bytes("o") - tx0
    tcp = {k: v - tcp0[k] for k, v in lan.tcp_segments("o").items()}
    print(f"origin TCP: {tcp['OutSegs']} segments sent, {tcp['RetransSegs']} retransmitted "
          f"({100 * tcp['RetransSegs'] / max(tcp['OutSegs'], 1):.1f}%)")
    drops = {n: (u - drops0[n][0], d - drops0[n][1]) for n, (u, d) in lan.tbf_drops().items()}
    print(f"packets dropped by the links' queues: origin uplink {drops['o'][0]}, hosts' uplinks "
          f"{sum(u for n, (u, _) in drops.items() if n != 'o')}, hosts' downlinks "
          f"{sum(d for n, (_, d) in drops.items() if n != 'o')}")
    cpu = sum(cpu_seconds(p.pid) for p in hosts.values()) - cpu0
    for p in hosts.values():
        procs.stop(p)
    print(f"host daemons used {cpu:.1f} CPU s in {wall:.1f} s ({cpu / wall:.2f} cores; the machine has "
          f"{os.cpu_count()}, load {os.getloadavg()[0]:.1f}); {machine}")
    print("origin sent, MB/s per 2 s:       " + " ".join(f"{r:4.1f}" for r in sampler.rates(2.0, 1)))
    print("a host received, MB/s per 2 s:   " + " ".join(f"{r:4.1f}" for r in sampler.rates(2.0, 2, len(hosts))))
    print("a host sent, MB/s per 2 s:       " + " ".join(f"{r:4.1f}" for r in sampler.rates(2.0, 3, len(hosts))))
    return wall, sent, done


def machine_cpu() -> list[int]:
    """The machine's CPU time counters (user, nice, system, idle, iowait, irq, softirq, steal)."""
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]


def cpu_report(before: list[int], after: list[int]) -> str:
    """Busy and stolen shares of the machine's CPU time between two readings. Steal is time the
    hypervisor gave to other guests: on a shared VM it slows the whole emulated LAN, whichever way
    is being timed, so a figure taken under heavy steal is not comparable with one taken without."""
    d = [b - a for a, b in zip(before, after)]
    total = sum(d) or 1
    busy = total - d[3] - d[4] - d[7]
    return f"machine CPU busy {100 * busy / total:.0f}%, stolen by the hypervisor {100 * d[7] / total:.0f}%"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (the `ip netns exec` pid is the exec'd program)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LinkSampler(threading.Thread):
    """Bytes on every node's link over time, read on the bridge side (one `ip` call per sample):
    shows whether the origin was kept busy and how fast the hosts were receiving. These are the
    veth counters, which count a GSO packet's headers once (about 1% under the tbf's count that
    `Lan.sent_bytes` gives the totals); reading every tbf would take 18 `tc` calls per sample."""

    def __init__(self, lan: Lan):
        super().__init__(daemon=True)
        self.lan = lan
        # time, origin sent, bytes all hosts received, bytes all hosts sent
        self.samples: list[tuple[float, int, int, int]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            links = self.lan.bridge_side_bytes()
            sent = links["o"][1]
            received = sum(tx for node, (tx, _) in links.items() if node != "o")
            uploaded = sum(rx for node, (_, rx) in links.items() if node != "o")
            self.samples.append((time.monotonic(), sent, received, uploaded))
            self._stop_event.wait(0.5)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def rates(self, step: float, column: int, per: int = 1) -> list[float]:
        """MB/s per `step` seconds of one column (1: origin sent, 2: hosts received, 3: hosts sent),
        divided by `per`."""
        out, last = [], self.samples[0] if self.samples else None
        for row in self.samples[1:]:
            if row[0] - last[0] >= step:
                out.append((row[column] - last[column]) / (row[0] - last[0]) / 1e6 / per)
                last = row
        return out


def run_http(lan: Lan, procs: Procs, work: Path, entry) -> tuple[float, int, dict]:
    url = f"http://{ORIGIN_IP}:{HTTP_PORT}/images/{entry.file_name}"
    tx0 = lan.sent_bytes("o")
    machine0 = machine_cpu()
    t0 = time.monotonic()
    pulls = {}
    for n in lan.nodes():
        if n == "o":
            continue
        out = work / n / "http.qcow2"
        script = f"curl -sSf -o {out} {url} && sha256sum {out} > {out}.sha && mv {out}.sha {out}.ok"
        pulls[n] = procs.start(lan, n, ["sh", "-c", script], work / n / "http.log")
    done = wait_for({n: work / n / "http.qcow2.ok" for n in pulls}, pulls, t0, timeout=900)
    wall = max(done.values())
    print(f"plain HTTP: {cpu_report(machine0, machine_cpu())}")
    sent = lan.sent_bytes("o") - tx0
    for n in pulls:
        got = (work / n / "http.qcow2.ok").read_text().split()[0]
        if got != entry.sha256:
            raise RuntimeError(f"{n}: HTTP copy has sha256 {got}, expected {entry.sha256}")
    return wall, sent, done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--origin-rate", type=int, default=12_000_000,
                    help="bytes/s the origin paces among interested hosts (its link's goodput)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--swarm-only", action="store_true", help="skip the HTTP run (tuning; no summary line)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("swarm_lan: needs root (network namespaces, tc)", file=sys.stderr)
        return 1
    lan = Lan(prefix=f"sjb{os.getpid() % 100000}", hosts=args.hosts)
    procs = Procs()
    work = Path(tempfile.mkdtemp(prefix="swarm-lan-"))
    try:
        print(f"image: {args.size_mib} MiB random-data qcow2; building the catalogue...", flush=True)
        entry, key = make_catalogue(work, args.size_mib)
        lan.create()
        http_server = procs.start(lan, "o", [str(VENV_BIN / "salvus_jobs"), "catalogue", "serve", "--dir",
                                             str(work / "catalogue"), "--bind", f"{ORIGIN_IP}:{HTTP_PORT}"],
                                  work / "http-origin.log")
        time.sleep(1.5)
        if http_server.poll() is not None:
            raise RuntimeError((work / "http-origin.log").read_text())
        print(f"LAN: origin + {args.hosts} hosts, 100 Mbit/s tbf links, {SUBNET}.0/24 in namespaces {lan.prefix}-*",
              flush=True)
        swarm_s, swarm_sent, swarm_done = run_swarm(lan, procs, work, entry, key, args.origin_rate)
        print(f"imgdist swarm: {swarm_s:6.1f} s  (hosts done at "
              f"{', '.join(f'{t:.1f}' for t in sorted(swarm_done.values()))} s)", flush=True)
        if args.swarm_only:
            print(f"swarm only: link_fraction={entry.size * 8 / LINK_BITS / swarm_s:.2f} "
                  f"origin_copies={swarm_sent / entry.size:.2f}")
            return 0
        http_s, http_sent, http_done = run_http(lan, procs, work, entry)
        print(f"plain HTTP:    {http_s:6.1f} s  (hosts done at "
              f"{', '.join(f'{t:.1f}' for t in sorted(http_done.values()))} s)", flush=True)
    finally:
        procs.stop_all()
        lan.delete()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}")
    size = entry.size
    link_limit = size * 8 / LINK_BITS
    swarm_copies, http_copies = swarm_sent / size, http_sent / size
    print(f"link limit (size / 100 Mbit/s per host): {link_limit:.1f} s; HTTP fan-out limit: "
          f"{link_limit * args.hosts:.1f} s")
    print(f"{'':14}{'wall s':>8}{'origin copies':>15}")
    print(f"{'imgdist':14}{swarm_s:8.1f}{swarm_copies:15.2f}")
    print(f"{'plain HTTP':14}{http_s:8.1f}{http_copies:15.2f}")
    print("note: origin copies count every byte on the origin's link (headers, BitTorrent overhead)")
    print(f"swarm_s={swarm_s:.1f} http_s={http_s:.1f} speedup={http_s / swarm_s:.2f} "
          f"link_fraction={link_limit / swarm_s:.2f} origin_copies={swarm_copies:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
