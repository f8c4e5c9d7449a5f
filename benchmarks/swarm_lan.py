"""Swarm vs plain HTTP on an emulated LAN: origin + N hypervisors, shaped links (run as root).

The LAN is network namespaces this script creates and deletes: one holding a bridge, one per node,
veth pairs shaped with `tbf rate Mmbit` on both ends (100 Mbit/s unless --link-mbit), addresses
from the benchmarking range 198.18.0.0/24 that exist only inside those namespaces. The origin runs
the catalogue's HTTP server (index, torrents, web seed) and `imgdist --origin` (seeder + tracker,
paced per host at its link's rate); every host runs `imgdist --daemon` with the site's host list
(steering: striped priorities, origin gated once a host's slice is done). Then, in the same run,
every host fetches the same image with plain HTTP (`curl`, then `sha256sum`, as a naive script
would) when that takes at most HTTP_MEASURE_MAX_S by the fan-out limit (the default run);
otherwise the HTTP figure is computed (hosts x image / origin link) and marked so. The imgdist
daemons run before the clock starts, as deployed; it starts when the image is approved and they
are reloaded (SIGHUP).

    sudo .venv/bin/python benchmarks/swarm_lan.py [--size-mib 256] [--hosts 8] [--link-mbit 100]
    sudo .venv/bin/python benchmarks/swarm_lan.py --hosts 32 --link-mbit 20 --swarm-only --nic-queue 1000 --mtu 9000 [--churn]

Figures: wall time of each way (until the last host has the verified image), their ratio, the swarm
time as a fraction of the per-host link limit (size / link rate), the per-host completion times'
p50/p99/max, and the origin's egress in image copies (bytes sent on its link / image size). The
last line is key=value pairs. Each way also reports how busy the machine's CPUs were and how much
of their time the hypervisor gave to other guests (steal): the LAN is emulated on this machine's
CPUs, so a run whose CPUs were saturated measured the CPUs, not the swarm, and is marked valid=0.
With --churn, the last 4 hosts (of 32; a quarter of fewer) are told about the image 30 s late and
one host's daemon is SIGKILLed mid-pull and restarted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
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
# What the origin paces its hosts to, as a share of its link's rate (12 MB/s on 100 Mbit/s: one TCP
# flow's goodput on these links is ~11.9 MB/s, so the origin's queue stays short).
ORIGIN_RATE_SHARE = 0.96
# Plain HTTP is measured when its fan-out limit is at most this (the default run: 8 x 21.5 s);
# beyond it the figure is computed, as 32 hosts at 20 Mbit/s would take an hour.
HTTP_MEASURE_MAX_S = 300.0
# A run is not valid when the machine's CPUs (busy + stolen) were this loaded on average, or when
# more than SATURATED_SHARE of its 2 s intervals were at SATURATED_INTERVAL or above.
VALID_MAX_CPU = 0.80
SATURATED_INTERVAL = 0.95
SATURATED_SHARE = 0.10
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
    link_mbit: int = 100
    nic_queue: int = 0  # packets a node's own uplink queues (0: the switch ports' 50 ms)
    mtu: int = 1500
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
                if self.mtu != 1500:  # the bridge follows its ports' MTU
                    sh("ip", "-n", where, "link", "set", dev, "mtu", str(self.mtu))
                queue = (["limit", str(self.nic_queue * (self.mtu + 14))] if self.nic_queue and dev == "eth0"
                         else ["latency", "50ms"])
                sh("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                   "rate", f"{self.link_mbit}mbit", "burst", "64kb", *queue)

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

    def start(self, lan: Lan, node: str, args: list[str], log: Path, env: dict | None = None,
              append: bool = False) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", lan.ns(node), *args], stdout=open(log, "ab" if append else "wb"),
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


@dataclass
class Churn:
    """What happens to some hosts during a churn run, timed from the clock's start: the `late`
    hosts are told about the image `late_s` later than the others (their daemons idle until then),
    and `kill`'s daemon is SIGKILLed at `kill_at` and started again `restart_after` later (it
    resumes from its partial file and resume data)."""

    late: list[str]
    late_s: float
    kill: str
    kill_at: float
    restart_after: float = 2.0
    told_late: bool = False
    killed: float = 0.0
    restarted: float = 0.0
    killed_holding: int = 0  # bytes of the partial file on disk when it was killed
    cpu_of_killed: float = 0.0

    @classmethod
    def plan(cls, hosts: list[str], link_limit: float, late_s: float) -> Churn:
        late = hosts[-max(1, min(4, len(hosts) // 4)):]
        # Mid-pull for the early hosts: about half their own time at the link limit.
        return cls(late=late, late_s=late_s, kill=hosts[1], kill_at=max(2.0, 0.5 * link_limit))

    def down(self) -> set[str]:
        return {self.kill} if self.killed and not self.restarted else set()

    def step(self, elapsed: float, start_host, procs: dict[str, subprocess.Popen], partial: Path) -> None:
        if not self.told_late and elapsed >= self.late_s:
            for n in self.late:
                os.killpg(procs[n].pid, signal.SIGHUP)
            self.told_late = True
        if not self.killed and elapsed >= self.kill_at:
            p = procs[self.kill]
            self.cpu_of_killed = cpu_seconds(p.pid)
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            self.killed = elapsed
            try:
                self.killed_holding = partial.stat().st_blocks * 512
            except FileNotFoundError:
                self.killed_holding = 0
        if self.killed and not self.restarted and elapsed >= self.killed + self.restart_after:
            procs[self.kill] = start_host(self.kill)
            self.restarted = elapsed


def wait_for(paths: dict[str, Path], procs: dict[str, subprocess.Popen], t0: float, timeout: float,
             step=None, down=lambda: set()) -> dict[str, float]:
    """Seconds after t0 at which each path appeared; `step(elapsed)` runs every round (churn) and
    the processes `down()` names may be gone meanwhile."""
    done: dict[str, float] = {}
    while len(done) < len(paths) and time.monotonic() - t0 < timeout:
        if step is not None:
            step(time.monotonic() - t0)
        for node, path in paths.items():
            if node not in done and path.exists():
                done[node] = time.monotonic() - t0
            if node not in done and node not in down() and procs[node].poll() is not None:
                raise RuntimeError(f"{node}: exited with {procs[node].returncode} before finishing")
        time.sleep(0.05)
    if len(done) < len(paths):
        raise RuntimeError(f"timed out after {timeout:.0f} s; done: {sorted(done)}")
    return done


@dataclass
class CpuShares:
    """The machine's CPU time over a run: busy (user, system, interrupts), stolen by the
    hypervisor, and the share of 2 s intervals in which busy + stolen was SATURATED_INTERVAL or
    more (an average hides a saturated stretch, e.g. every host hashing its image at once)."""

    busy: float
    steal: float
    saturated: float

    @property
    def valid(self) -> bool:
        return self.busy + self.steal < VALID_MAX_CPU and self.saturated <= SATURATED_SHARE

    def __str__(self) -> str:
        return (f"machine CPU busy {100 * self.busy:.0f}%, stolen by the hypervisor {100 * self.steal:.0f}%, "
                f"saturated (>= {100 * SATURATED_INTERVAL:.0f}%) in {100 * self.saturated:.0f}% of 2 s intervals")


@dataclass
class SwarmRun:
    wall: float
    sent: int  # bytes on the origin's link
    done: dict[str, float]
    cpu: CpuShares
    image_copies: float | None  # the origin's own count of image data sent, in copies
    churn: Churn | None = None


def run_swarm(lan: Lan, procs: Procs, work: Path, entry, key: Path, origin_rate: int,
              churn_late_s: float | None = None) -> SwarmRun:
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
    origin = procs.start(lan, "o", [imgdist, "--spec", str(specs["o"]), "--origin", str(work / "catalogue"),
                                    "--tracker-port", str(TRACKER_PORT)], work / "o" / "origin.log")
    time.sleep(2)  # the tracker and seeder up before the hosts announce

    def start_host(n: str, append: bool = False) -> subprocess.Popen:
        return procs.start(lan, n, [imgdist, "--spec", str(specs[n]), "--daemon", "--interval", "3600"],
                           work / n / "imgdist.log", append=append)

    hosts = {n: start_host(n) for n in lan.nodes() if n != "o"}
    idle = {n: work / n / "store" / "state" / "imgdist-status.json" for n in hosts}
    wait_for(idle, hosts, time.monotonic(), timeout=300)
    for n in hosts:
        approve(load_spec(specs[n]), "bench@1")
    link_limit = entry.size * 8 / (lan.link_mbit * 1e6)
    churn = Churn.plan(list(hosts), link_limit, churn_late_s) if churn_late_s is not None else None
    tx0 = lan.sent_bytes("o")
    tcp0 = lan.tcp_segments("o")
    drops0 = lan.tbf_drops()
    cpu0 = {n: cpu_seconds(p.pid) for n, p in hosts.items()}
    machine0 = machine_cpu()
    sampler = LinkSampler(lan)
    sampler.start()
    t0 = time.monotonic()
    for n, p in hosts.items():
        if churn is None or n not in churn.late:
            os.killpg(p.pid, signal.SIGHUP)
    targets = {n: work / n / "store" / "images" / "base" / entry.file_name for n in hosts}
    partial = work / (churn.kill if churn else "") / "store" / "images" / "partial" / entry.file_name

    def step(elapsed: float) -> None:
        if churn is not None:
            churn.step(elapsed, lambda n: start_host(n, append=True), hosts, partial)
    try:
        done = wait_for(targets, hosts, t0, timeout=max(900, 8 * link_limit), step=step,
                        down=churn.down if churn is not None else lambda: set())
    finally:
        sampler.stop()
    wall = max(done.values())
    cpu = cpu_shares(machine0, machine_cpu(), sampler.cpu_intervals(2.0))
    sent = lan.sent_bytes("o") - tx0
    tcp = {k: v - tcp0[k] for k, v in lan.tcp_segments("o").items()}
    print(f"origin TCP: {tcp['OutSegs']} segments sent, {tcp['RetransSegs']} retransmitted "
          f"({100 * tcp['RetransSegs'] / max(tcp['OutSegs'], 1):.1f}%)")
    drops = {n: (u - drops0[n][0], d - drops0[n][1]) for n, (u, d) in lan.tbf_drops().items()}
    print(f"packets dropped by the links' queues: origin uplink {drops['o'][0]}, hosts' uplinks "
          f"{sum(u for n, (u, _) in drops.items() if n != 'o')}, hosts' downlinks "
          f"{sum(d for n, (_, d) in drops.items() if n != 'o')}")
    used = sum(cpu_seconds(p.pid) for p in hosts.values()) - sum(cpu0.values())
    if churn is not None:  # the killed daemon's own time; its restart's counts from zero
        used += churn.cpu_of_killed
    for p in hosts.values():
        procs.stop(p)
    procs.stop(origin)
    print(f"host daemons used {used:.1f} CPU s in {wall:.1f} s ({used / wall:.2f} cores; the machine has "
          f"{os.cpu_count()}, load {os.getloadavg()[0]:.1f}); {cpu}")
    print("origin sent, MB/s per 2 s:       " + " ".join(f"{r:4.1f}" for r in sampler.rates(2.0, 1)))
    print("a host received, MB/s per 2 s:   " + " ".join(f"{r:4.1f}" for r in sampler.rates(2.0, 2, len(hosts))))
    print("a host sent, MB/s per 2 s:       " + " ".join(f"{r:4.1f}" for r in sampler.rates(2.0, 3, len(hosts))))
    print("CPU busy+steal %, per 2 s:       " + " ".join(f"{100 * c:4.0f}" for c in sampler.cpu_intervals(2.0)))
    # The origin's own account of what it sent twice (imagedist.sendlog), when it logged one.
    for line in re.findall(r"origin: [^:]+: (sent \d+ blocks.*)", (work / "o" / "origin.log").read_text(errors="replace")):
        print(f"origin blocks: {line}")
    return SwarmRun(wall, sent, done, cpu, origin_image_copies(work / "o" / "origin.log"), churn)


def origin_image_copies(log: Path) -> float | None:
    """The origin's own count of image data it sent (logged when it stops), in copies."""
    found = re.findall(r"\(([0-9.]+) copies\)", log.read_text(errors="replace"))
    return float(found[-1]) if found else None


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default): with 32 hosts, p99 lies
    between the slowest two."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def machine_cpu() -> list[int]:
    """The machine's CPU time counters (user, nice, system, idle, iowait, irq, softirq, steal)."""
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]


def busy_steal(before: list[int], after: list[int]) -> tuple[float, float]:
    """Busy and stolen shares of the machine's CPU time between two readings. Steal is time the
    hypervisor gave to other guests: on a shared VM it slows the whole emulated LAN, whichever way
    is being timed, so a figure taken under heavy steal is not comparable with one taken without."""
    d = [b - a for a, b in zip(before, after)]
    total = sum(d) or 1
    busy = total - d[3] - d[4] - d[7]
    return busy / total, d[7] / total


def cpu_shares(before: list[int], after: list[int], intervals: list[float]) -> CpuShares:
    busy, steal = busy_steal(before, after)
    saturated = sum(1 for c in intervals if c >= SATURATED_INTERVAL) / len(intervals) if intervals else 0.0
    return CpuShares(busy, steal, saturated)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (the `ip netns exec` pid is the exec'd program)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LinkSampler(threading.Thread):
    """Bytes on every node's link over time, read on the bridge side (one `ip` call per sample),
    and the machine's CPU counters: shows whether the origin was kept busy, how fast the hosts
    were receiving, and whether the CPUs were saturated at some point. These are the veth
    counters, which count a GSO packet's headers once (about 1% under the tbf's count that
    `Lan.sent_bytes` gives the totals); reading every tbf would take 2 `tc` calls per node."""

    def __init__(self, lan: Lan):
        super().__init__(daemon=True)
        self.lan = lan
        # time, origin sent, bytes all hosts received, bytes all hosts sent
        self.samples: list[tuple[float, int, int, int]] = []
        self.cpu: list[tuple[float, list[int]]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.cpu.append((time.monotonic(), machine_cpu()))
            links = self.lan.bridge_side_bytes()
            sent = links["o"][1]
            received = sum(tx for node, (tx, _) in links.items() if node != "o")
            uploaded = sum(rx for node, (_, rx) in links.items() if node != "o")
            self.samples.append((time.monotonic(), sent, received, uploaded))
            self._stop_event.wait(0.5)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.cpu.append((time.monotonic(), machine_cpu()))

    def rates(self, step: float, column: int, per: int = 1) -> list[float]:
        """MB/s per `step` seconds of one column (1: origin sent, 2: hosts received, 3: hosts sent),
        divided by `per`."""
        out, last = [], self.samples[0] if self.samples else None
        for row in self.samples[1:]:
            if row[0] - last[0] >= step:
                out.append((row[column] - last[column]) / (row[0] - last[0]) / 1e6 / per)
                last = row
        return out

    def cpu_intervals(self, step: float) -> list[float]:
        """Busy + stolen share of the machine's CPU time per `step` seconds."""
        out, last = [], self.cpu[0] if self.cpu else None
        for row in self.cpu[1:]:
            if row[0] - last[0] >= step:
                out.append(sum(busy_steal(last[1], row[1])))
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
    busy, steal = busy_steal(machine0, machine_cpu())
    print(f"plain HTTP: machine CPU busy {100 * busy:.0f}%, stolen by the hypervisor {100 * steal:.0f}%")
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
    ap.add_argument("--link-mbit", type=int, default=100, help="every node's link, each way (Mbit/s)")
    ap.add_argument("--origin-rate", type=int, default=None,
                    help=f"bytes/s the origin paces among interested hosts (default: {ORIGIN_RATE_SHARE} "
                         "of its link's rate, 12,000,000 at 100 Mbit/s)")
    ap.add_argument("--nic-queue", type=int, default=0,
                    help="packets each node's own uplink (its NIC) queues, as a host's txqueuelen "
                         "(default 0: 50 ms, like the switch ports)")
    ap.add_argument("--mtu", type=int, default=1500,
                    help="every link's MTU (default 1500; 9000: jumbo frames, as many hypervisor "
                         "networks run, a sixth of the packets per byte for this machine's CPUs to emulate)")
    ap.add_argument("--churn", action="store_true",
                    help="the last hosts (4 of 32) start late, one host is killed mid-pull and restarted")
    ap.add_argument("--late-s", type=float, default=30.0, help="how late the churn run's late hosts start")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--swarm-only", action="store_true", help="skip the HTTP run (its figure is computed)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("swarm_lan: needs root (network namespaces, tc)", file=sys.stderr)
        return 1
    if not 2 <= args.hosts <= 200 or not 1 <= args.link_mbit <= 10_000 or not 1280 <= args.mtu <= 65_000:
        print("swarm_lan: --hosts must be 2..200, --link-mbit 1..10000 and --mtu 1280..65000", file=sys.stderr)
        return 2
    link_bits = args.link_mbit * 1_000_000
    origin_rate = args.origin_rate if args.origin_rate is not None else int(ORIGIN_RATE_SHARE * link_bits / 8)
    lan = Lan(prefix=f"sjb{os.getpid() % 100000}", hosts=args.hosts, link_mbit=args.link_mbit,
              nic_queue=args.nic_queue, mtu=args.mtu)
    procs = Procs()
    work = Path(tempfile.mkdtemp(prefix="swarm-lan-"))
    http = None
    try:
        print(f"image: {args.size_mib} MiB random-data qcow2; building the catalogue...", flush=True)
        entry, key = make_catalogue(work, args.size_mib)
        size = entry.size
        link_limit = size * 8 / link_bits
        measure_http = not args.swarm_only and args.hosts * link_limit <= HTTP_MEASURE_MAX_S
        lan.create()
        http_server = procs.start(lan, "o", [str(VENV_BIN / "salvus_jobs"), "catalogue", "serve", "--dir",
                                             str(work / "catalogue"), "--bind", f"{ORIGIN_IP}:{HTTP_PORT}"],
                                  work / "http-origin.log")
        time.sleep(1.5)
        if http_server.poll() is not None:
            raise RuntimeError((work / "http-origin.log").read_text())
        print(f"LAN: origin + {args.hosts} hosts, {args.link_mbit} Mbit/s tbf links, MTU {args.mtu}, origin paced at "
              f"{origin_rate / 1e6:.2f} MB/s, {SUBNET}.0/24 in namespaces {lan.prefix}-*", flush=True)
        run = run_swarm(lan, procs, work, entry, key, origin_rate, args.late_s if args.churn else None)
        print(f"imgdist swarm: {run.wall:6.1f} s  (hosts done at "
              f"{', '.join(f'{t:.1f}' for t in sorted(run.done.values()))} s)", flush=True)
        if measure_http:
            http = run_http(lan, procs, work, entry)
            print(f"plain HTTP:    {http[0]:6.1f} s  (hosts done at "
                  f"{', '.join(f'{t:.1f}' for t in sorted(http[2].values()))} s)", flush=True)
    finally:
        procs.stop_all()
        lan.delete()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}")
    times = list(run.done.values())
    p50, p99 = percentile(times, 0.50), percentile(times, 0.99)
    swarm_copies = run.sent / size
    fanout = link_limit * args.hosts
    print(f"link limit (size / {args.link_mbit} Mbit/s per host): {link_limit:.1f} s; HTTP fan-out limit "
          f"(hosts x size / origin link): {fanout:.1f} s")
    print(f"per-host completion: p50 {p50:.1f} s, p99 {p99:.1f} s, max {run.wall:.1f} s "
          f"(p99 / p50 = {p99 / p50:.3f}); the median host at {link_limit / p50:.2f} of the link limit")
    if run.churn is not None:
        c = run.churn
        late = [run.done[n] - c.late_s for n in c.late]
        print(f"churn: {', '.join(c.late)} told {c.late_s:.0f} s late, done {max(late):.1f} s after that at "
              f"the latest; {c.kill} SIGKILLed at {c.killed:.1f} s holding {c.killed_holding / MiB:.0f} MiB, "
              f"restarted at {c.restarted:.1f} s, done at {run.done[c.kill]:.1f} s")
    print(f"{'':14}{'wall s':>8}{'origin copies':>15}")
    print(f"{'imgdist':14}{run.wall:8.1f}{swarm_copies:15.2f}"
          + (f"   (image data: {run.image_copies:.3f}, the origin's count)" if run.image_copies is not None else ""))
    if http is not None:
        http_s, http_part = http[0], f"http_s={http[0]:.1f} speedup={http[0] / run.wall:.2f}"
        print(f"{'plain HTTP':14}{http_s:8.1f}{http[1] / size:15.2f}")
    else:
        http_part = f"http_s_computed={fanout:.1f} speedup_computed={fanout / run.wall:.2f}"
        print(f"{'plain HTTP':14}{fanout:8.1f}{args.hosts:15.2f}   (computed: hosts x size / origin link)")
    print("note: origin copies count every byte on the origin's link (headers, BitTorrent overhead)")
    print(f"CPU: {run.cpu}; " + ("valid" if run.cpu.valid else
          f"NOT VALID: the CPUs were saturated (busy + stolen >= {100 * VALID_MAX_CPU:.0f}% on average or "
          f">= {100 * SATURATED_INTERVAL:.0f}% in more than {100 * SATURATED_SHARE:.0f}% of the intervals)"))
    print(f"hosts={args.hosts} link_mbit={args.link_mbit} mtu={args.mtu} swarm_s={run.wall:.1f} {http_part} "
          f"p50_s={p50:.1f} p99_s={p99:.1f} link_fraction={link_limit / run.wall:.2f} "
          f"p50_link_fraction={link_limit / p50:.2f} origin_copies={swarm_copies:.3f} "
          + ("churn=1 " if run.churn is not None else "")
          + f"cpu_busy={run.cpu.busy:.2f} cpu_steal={run.cpu.steal:.2f} valid={int(run.cpu.valid)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
