"""The origin: seeds every image of a catalogue directory, runs the tracker, paces per host.

Run next to the catalogue's HTTP server (`salvus_jobs catalogue serve`, the web seed) as
`imgdist --origin DIR`. Pacing: each host that announces gets a peer class (its own for the
first 28, see Pacer); the classes share `imgdist.origin_upload_rate` in proportion to what each
interested host still lacks of its own stripe (imagedist.steering.pacing_limits), because plain
TCP shares the origin link very unevenly and the laggards then hold the whole swarm back. A
listed host's stripe is its place in `hypervisor.hosts` (by address), not what it announces.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import libtorrent as lt

from cluster.spec import ClusterSpec
from imagedist import steering
from imagedist.sendlog import SendLog
from imagedist.settings import SessionConfig, set_upload_limit
from imagedist.swarm import Swarm, info_hash_hex, torrent_info
from imagedist.tracker import MAX_PORTS_PER_IP, PEER_TTL, PeerTable, SiteHosts, Tracker, announce_hashes

log = logging.getLogger(__name__)

RESCAN_SECONDS = 10.0
PACE_SECONDS = 0.5


# libtorrent's peer-class filter takes a mask per address range as a signed 32-bit int (bit 31
# overflows in the bindings) and ids 0-2 are its own classes (global, tcp, local): 28 classes of
# ours at most. Hosts beyond that share classes.
FIRST_CLASS_ID, LAST_CLASS_ID = 3, 30
# A host neither announcing nor connected for this long has left: its class place is freed.
HOST_TTL = PEER_TTL


@dataclass
class _Host:
    cls: int
    seen: float


class Pacer:
    """Peer classes for the hosts at the origin, limits re-split every PACE_SECONDS.

    Each host gets a class of its own while there are classes left (28 hosts), then the class with
    the fewest hosts; a shared class's limit is the sum of its hosts' shares (TCP then splits it
    among them, unevenly, but the origin's total stays paced). `add_host` runs on the tracker's
    thread at every announce, so a new host's class exists before it can connect (classes are
    assigned at connection time). libtorrent session calls are thread-safe; the lock guards ours.
    """

    def __init__(self, session: lt.session, rate: int, table: PeerTable,
                 clock: Callable[[], float] = time.monotonic):
        self.session = session
        self.rate = rate
        self.table = table
        self.clock = clock
        self.hosts: dict[str, _Host] = {}
        self.members: dict[int, set[str]] = {}  # our class id -> host IPs in it
        self._pool_full = False
        self._limits: dict[str, int] = {}
        self._class_limits: dict[int, int] = {}
        self._filter = lt.ip_filter()
        self._lock = threading.Lock()

    def add_host(self, ip: str) -> None:
        if self.rate <= 0:
            return
        now = self.clock()
        with self._lock:
            host = self.hosts.get(ip)
            if host is not None:
                host.seen = now
                return
            try:
                cls = self._class_for_new_host()
                self.hosts[ip] = _Host(cls, now)
                self.members[cls].add(ip)
                self._limits[ip] = self.rate
                if len(self.members[cls]) == 1:
                    # Until the first update, a new host alone in its class gets the whole origin
                    # rate, not unlimited; in a shared class it takes from its class mates.
                    self._set_class_limit(cls, self.rate)
                self._apply_filter()
            except (RuntimeError, OverflowError, ValueError) as e:
                self._forget(ip)
                log.warning("origin: cannot pace %s (%s); it shares the unpaced rest", ip, e)

    def _class_for_new_host(self) -> int:
        empty = [c for c, m in self.members.items() if not m]
        if empty:
            return min(empty)
        if not self._pool_full:
            cls = self.session.create_peer_class("imgdist hosts")
            if FIRST_CLASS_ID <= cls <= LAST_CLASS_ID:
                self.members[cls] = set()
                return cls
            self.session.delete_peer_class(cls)  # beyond the filter's mask
            self._pool_full = True
        if not self.members:
            raise RuntimeError("libtorrent gave no peer class the filter can name")
        return min(self.members, key=lambda c: (len(self.members[c]), c))

    def _set_class_limit(self, cls: int, limit: int) -> None:
        if self._class_limits.get(cls) != limit:
            set_upload_limit(self.session, cls, f"imgdist hosts {cls}", limit)
            self._class_limits[cls] = limit

    def _apply_filter(self) -> None:
        glob = 1 << self.session.global_peer_class_id
        f = lt.ip_filter()
        f.add_rule("0.0.0.0", "255.255.255.255", glob)
        f.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", glob)
        for ip, host in self.hosts.items():
            f.add_rule(ip, ip, glob | (1 << host.cls))
        self.session.set_peer_class_filter(f)
        self._filter = f

    def _forget(self, ip: str) -> None:
        host = self.hosts.pop(ip, None)
        if host is not None:
            self.members[host.cls].discard(ip)
        self._limits.pop(ip, None)

    def class_of(self, ip: str) -> int | None:
        """The peer class a connection from `ip` gets (by the filter libtorrent was given)."""
        with self._lock:
            mask = self._filter.access(ip)
        ours = [c for c in range(FIRST_CLASS_ID, LAST_CLASS_ID + 1) if mask & (1 << c)]
        return ours[0] if ours else None

    def limits(self) -> dict[str, int]:
        """Host IP -> its share of the origin's rate (bytes/s) now."""
        with self._lock:
            return dict(self._limits)

    def update(self, handles: list[lt.torrent_handle]) -> None:
        if self.rate <= 0:
            return
        stripes = self.table.stripes_by_ip()
        wants: list[tuple[str, int | None]] = []
        connected: set[str] = set()
        for h in handles:
            rows: list[tuple[str, int | None]] = []
            per_ip: dict[str, int] = {}
            for p in h.get_peer_info():
                ip = p.ip[0]
                connected.add(ip)
                if not p.flags & lt.peer_info.remote_interested or p.flags & lt.peer_info.seed:
                    continue
                # One machine's connections count as at most the ports the tracker lets it hold.
                per_ip[ip] = per_ip.get(ip, 0) + 1
                if per_ip[ip] <= MAX_PORTS_PER_IP:
                    stripe = stripes.get(ip)
                    rows.append((ip, steering.missing_in_stripe(p.pieces, stripe) if stripe and p.pieces else None))
            ti = h.torrent_file() if rows else None
            wants += steering.cap_wants(rows, ti.num_pieces() if ti is not None else 0)
        self.apply(wants, connected)

    def apply(self, wants: list[tuple[str, int | None]], connected: set[str]) -> None:
        """Sets the class limits from what each interested host lacks (`wants`, see
        steering.pacing_limits); hosts neither connected nor announcing for HOST_TTL are dropped."""
        limits = steering.pacing_limits(self.rate, wants)
        now = self.clock()
        with self._lock:
            for ip in connected:
                if ip in self.hosts:
                    self.hosts[ip].seen = now
            gone = [ip for ip, host in self.hosts.items() if now - host.seen > HOST_TTL]
            for ip in gone:
                self._forget(ip)
            for ip in self.hosts:
                self._limits[ip] = limits.get(ip, self.rate)
            for cls, members in self.members.items():
                paced = [limits[ip] for ip in members if ip in limits]
                # A class none of whose hosts is interested may use the whole rate (as a new host).
                self._set_class_limit(cls, min(sum(paced), self.rate) if paced else self.rate)
            if gone:
                log.info("origin: %d host(s) left: %s", len(gone), ", ".join(sorted(gone)[:8]))
                try:
                    self._apply_filter()
                except (RuntimeError, OverflowError, ValueError) as e:
                    log.warning("origin: cannot update the pacing filter: %s", e)


def catalogue_torrents(directory: Path) -> dict[str, tuple[bytes, Path]]:
    """NAME-VERSION -> (metainfo, image file) for every torrent whose image is present."""
    out: dict[str, tuple[bytes, Path]] = {}
    for tf in sorted((directory / "torrents").glob("*.torrent")):
        try:
            meta = tf.read_bytes()
            ti = torrent_info(meta)
        except (OSError, ValueError) as e:
            log.warning("%s: skipped: %s", tf, e)
            continue
        image = directory / "images" / ti.name()
        if not image.is_file():
            log.warning("%s: its image %s is missing; not seeding it", tf, image)
            continue
        out[tf.stem] = (meta, image)
    return out


class Origin:
    def __init__(self, spec: ClusterSpec, directory: Path, tracker_port: int, bind: str = "0.0.0.0"):
        cfg = spec.imgdist
        self.directory = directory
        self.swarm = Swarm(SessionConfig(bind, cfg.listen_port, "origin"))
        # Listed hosts are placed (stripe, allowlist) by their addresses in the site's host list.
        self.table = PeerTable(site=SiteHosts.from_spec(spec.hypervisor.hosts, cfg.tracker_hosts_only))
        self.pacer = Pacer(self.swarm.session, cfg.origin_upload_rate, self.table)
        self.table.on_announce = self.pacer.add_host
        self.tracker = Tracker(bind, tracker_port, self.table, cfg.listen_port)
        self.handles: dict[str, lt.torrent_handle] = {}
        self.sendlogs: dict[str, SendLog] = {}
        self.swarm.on_upload = self._uploaded_block
        if cfg.tracker_hosts_only:
            self._admit_only(sorted(self.table.site.stripes))

    def _admit_only(self, ips: list[str]) -> None:
        """Strangers may not announce, nor connect to the seeder directly (the info hashes are in
        the public index). The origin never pulls, so its Swarm never bans and resets this filter."""
        f = lt.ip_filter()
        f.add_rule("0.0.0.0", "255.255.255.255", 1)
        f.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 1)
        for ip in ips:
            f.add_rule(ip, ip, 0)
        self.swarm.session.set_ip_filter(f)

    def rescan(self) -> None:
        current = catalogue_torrents(self.directory)
        for key, (meta, image) in current.items():
            ti = torrent_info(meta)
            ih = info_hash_hex(ti)
            if ih not in self.swarm.seeding():
                self.table.allow(announce_hashes(ti))
                self.swarm.seed(key, meta, image.parent, image.name)
        wanted = {info_hash_hex(torrent_info(m)) for m, _ in current.values()}
        for ih in self.swarm.seeding() - wanted:
            self.swarm.unseed(ih)

    def _uploaded_block(self, a: lt.block_uploaded_alert) -> None:
        self.sendlogs.setdefault(a.torrent_name, SendLog()).record(a.piece_index, a.block_index, a.endpoint[0],
                                                                   time.monotonic())

    def uploaded(self) -> int:
        return sum(h.status().total_payload_upload for h in self.swarm.session.get_torrents())

    def run(self, should_stop: Callable[[], bool]) -> None:
        self.tracker.start()
        log.info("origin: seeding %s, tracker on port %d", self.directory, self.tracker.port)
        next_scan = next_pace = 0.0
        try:
            while not should_stop():
                now = time.monotonic()
                if now >= next_scan:
                    self.rescan()
                    next_scan = now + RESCAN_SECONDS
                if now >= next_pace:
                    try:
                        self.pacer.update(self.swarm.session.get_torrents())
                    except (RuntimeError, OverflowError, ValueError) as e:  # keep seeding, unpaced
                        log.warning("origin: pacing update failed: %s", e)
                    next_pace = now + PACE_SECONDS
                self.swarm.pump(0.25)
        finally:
            # What an operator sizes the origin's link by: image bytes sent, in copies of the image.
            for h in self.swarm.session.get_torrents():
                st = h.status()
                log.info("origin: %s: sent %.1f MiB of image data (%.3f copies)", st.name,
                         st.total_payload_upload / 2**20, st.total_payload_upload / max(st.total_wanted, 1))
                ti = h.torrent_file()
                if st.name in self.sendlogs and ti is not None:
                    log.info("origin: %s: %s", st.name, self.sendlogs[st.name].summary(
                        ti.num_pieces(), self.table.stripe_of))
            self.tracker.stop()
            self.swarm.close()
