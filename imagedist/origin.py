"""The origin: seeds every image of a catalogue directory, runs the tracker, paces per host.

Run next to the catalogue's HTTP server (`salvus_jobs catalogue serve`, the web seed) as
`imgdist --origin DIR`. Pacing: each host that announces gets its own peer class; the classes
share `imgdist.origin_upload_rate` in proportion to what each interested host still lacks of its
own stripe (imagedist.steering.pacing_limits), because plain TCP shares the origin link very
unevenly and the laggards then hold the whole swarm back.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

import libtorrent as lt

from cluster.spec import ClusterSpec
from imagedist import steering
from imagedist.settings import SessionConfig, set_upload_limit
from imagedist.swarm import Swarm, info_hash_hex, torrent_info
from imagedist.tracker import PeerTable, Tracker, announce_hashes

log = logging.getLogger(__name__)

RESCAN_SECONDS = 10.0
PACE_SECONDS = 0.5


class Pacer:
    """One peer class per host IP at the origin, limits re-split every PACE_SECONDS.

    `add_host` runs on the tracker's thread before it answers the host's first announce, so the
    host's class exists before it can connect (classes are assigned at connection time). libtorrent
    session calls are thread-safe; the lock guards our own maps.
    """

    def __init__(self, session: lt.session, rate: int, table: PeerTable):
        self.session = session
        self.rate = rate
        self.table = table
        self.classes: dict[str, int] = {}
        self._limits: dict[str, int] = {}
        self._lock = threading.Lock()

    def add_host(self, ip: str) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            if ip in self.classes:
                return
            cls = self.session.create_peer_class(f"host {ip}")
            # Until the first update, a new host gets the whole origin rate, not unlimited.
            set_upload_limit(self.session, cls, f"host {ip}", self.rate)
            self.classes[ip] = cls
            self._limits[ip] = self.rate
            glob = 1 << self.session.global_peer_class_id
            f = lt.ip_filter()
            f.add_rule("0.0.0.0", "255.255.255.255", glob)
            for host, c in self.classes.items():
                f.add_rule(host, host, glob | (1 << c))
            self.session.set_peer_class_filter(f)

    def limits(self) -> dict[str, int]:
        """Host IP -> the upload limit (bytes/s) its class has now."""
        with self._lock:
            return dict(self._limits)

    def update(self, handles: list[lt.torrent_handle]) -> None:
        if self.rate <= 0:
            return
        stripes = self.table.stripes_by_ip()
        wants: list[tuple[str, int | None]] = []
        for h in handles:
            for p in h.get_peer_info():
                if p.flags & lt.peer_info.remote_interested and not p.flags & lt.peer_info.seed:
                    stripe = stripes.get(p.ip[0])
                    wants.append((p.ip[0], steering.missing_in_stripe(p.pieces, stripe)
                                  if stripe and p.pieces else None))
        limits = steering.pacing_limits(self.rate, wants)
        with self._lock:
            for ip, cls in self.classes.items():
                want = limits.get(ip, self.rate)
                if self._limits.get(ip) != want:
                    set_upload_limit(self.session, cls, f"host {ip}", want)
                    self._limits[ip] = want


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
        self.table = PeerTable()
        self.pacer = Pacer(self.swarm.session, cfg.origin_upload_rate, self.table)
        self.table.on_new_ip = self.pacer.add_host
        self.tracker = Tracker(bind, tracker_port, self.table, cfg.listen_port)
        self.handles: dict[str, lt.torrent_handle] = {}

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
                    self.pacer.update(self.swarm.session.get_torrents())
                    next_pace = now + PACE_SECONDS
                self.swarm.pump(0.25)
        finally:
            # What an operator sizes the origin's link by: image bytes sent, in copies of the image.
            for h in self.swarm.session.get_torrents():
                st = h.status()
                log.info("origin: %s: sent %.1f MiB of image data (%.3f copies)", st.name,
                         st.total_payload_upload / 2**20, st.total_payload_upload / max(st.total_wanted, 1))
            self.tracker.stop()
            self.swarm.close()
