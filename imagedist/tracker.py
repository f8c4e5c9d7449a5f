"""A tiny HTTP BitTorrent tracker (BEP 3 announce, BEP 23 compact peers) run by the origin.

Hand-written because libtorrent has no tracker side and Debian's opentracker serves only
info-hashes whitelisted at build/config time; ours answers for exactly the torrents the origin
seeds, and lists the origin itself first (it seeds every image).
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import libtorrent as lt

from cluster.httpserver import ServerLimits, SiteHTTPServer
from imagedist.steering import Stripe, parse_stripe

log = logging.getLogger(__name__)

ANNOUNCE_INTERVAL = 10
PEER_TTL = 3 * ANNOUNCE_INTERVAL
MAX_PEERS = 200


@dataclass
class PeerTable:
    """info-hash (20 bytes as announced) -> {(ip, port): last seen}."""

    known: set[bytes] = field(default_factory=set)
    peers: dict[bytes, dict[tuple[str, int], float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    on_new_ip: Callable[[str], None] | None = None
    seen_ips: set[str] = field(default_factory=set)
    # (ip, port) as announced -> the stripe that host starts on. By address, because libtorrent
    # announces and handshakes under different peer ids; the origin's connections only show the IP.
    # A stripe counts while its host is in a peer list (announced within PEER_TTL), so a host that
    # died no longer draws a share of the origin's rate.
    stripes: dict[tuple[str, int], Stripe] = field(default_factory=dict)

    def note_stripe(self, ep: tuple[str, int], stripe: Stripe | None) -> None:
        with self.lock:
            if stripe is None:
                self.stripes.pop(ep, None)
            else:
                self.stripes[ep] = stripe

    def stripes_by_ip(self, now: float | None = None) -> dict[str, Stripe | None]:
        """IP -> the stripe of the host there; None when hosts sharing the IP (one machine, as in
        tests) announced different ones. One pass, for the pacer's every update."""
        now = time.time() if now is None else now
        seen: dict[str, set[Stripe]] = {}
        with self.lock:
            for ep, stripe in list(self.stripes.items()):
                last = max((swarm.get(ep, 0.0) for swarm in self.peers.values()), default=0.0)
                if now - last > PEER_TTL:
                    del self.stripes[ep]
                else:
                    seen.setdefault(ep[0], set()).add(stripe)
        return {ip: next(iter(found)) if len(found) == 1 else None for ip, found in seen.items()}

    def stripe_of(self, ip: str, now: float | None = None) -> Stripe | None:
        return self.stripes_by_ip(now).get(ip)

    def allow(self, info_hashes: list[bytes]) -> None:
        with self.lock:
            self.known.update(info_hashes)

    def announce(self, ih: bytes, ep: tuple[str, int], stopped: bool, now: float) -> list[tuple[str, int]] | None:
        new_ip = None
        with self.lock:
            if ih not in self.known:
                return None
            swarm = self.peers.setdefault(ih, {})
            for old, seen in list(swarm.items()):
                if now - seen > PEER_TTL:
                    del swarm[old]
            if stopped:
                swarm.pop(ep, None)
            else:
                swarm[ep] = now
                if ep[0] not in self.seen_ips:
                    self.seen_ips.add(ep[0])
                    new_ip = ep[0]
            others = [p for p in swarm if p != ep][:MAX_PEERS]
        if new_ip and self.on_new_ip:
            self.on_new_ip(new_ip)
        return others


def _compact(peers: list[tuple[str, int]]) -> bytes:
    out = bytearray()
    for ip, port in peers:
        try:
            out += socket.inet_aton(ip) + struct.pack("!H", port)
        except OSError:
            continue  # IPv6 peers would need BEP 7 `peers6`; the LAN is IPv4
    return bytes(out)


def make_handler(table: PeerTable, origin_port: int) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "imgdist-tracker/0.1"

        def log_message(self, fmt: str, *args) -> None:
            log.debug("tracker %s: " + fmt, self.client_address[0], *args)

        def _reply(self, body: dict) -> None:
            data = lt.bencode(body)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            url = urlsplit(self.path)
            if url.path != "/announce":
                self.send_error(404)
                return
            # latin-1 keeps the binary info_hash bytes as they were percent-encoded.
            q = parse_qs(url.query, encoding="latin-1")
            try:
                ih = q["info_hash"][0].encode("latin-1")
                port = int(q["port"][0])
                if len(ih) != 20 or not 0 < port < 65536:
                    raise ValueError
            except (KeyError, ValueError, IndexError):
                self._reply({b"failure reason": b"bad announce: need info_hash (20 bytes) and port"})
                return
            ip = self.client_address[0]
            stopped = q.get("event", [""])[0] == "stopped"
            others = table.announce(ih, (ip, port), stopped, time.time())
            if others is None:
                self._reply({b"failure reason": b"unknown info_hash: the origin does not seed it"})
                return
            # The origin seeds everything, at the address this host reached us on.
            origin = (self.connection.getsockname()[0], origin_port)
            if ipaddress.ip_address(origin[0]).version == 4 and origin != (ip, port):
                others = [origin, *[p for p in others if p != origin]]
            # A steered host names its stripe (`stripe=i/n`, see imagedist.steering): the origin
            # paces it by what it still lacks of that slice.
            table.note_stripe((ip, port), None if stopped else parse_stripe(q.get("stripe", [""])[0]))
            self._reply({b"interval": ANNOUNCE_INTERVAL, b"min interval": 2,
                         b"complete": 1, b"incomplete": len(others), b"peers": _compact(others)})

    return Handler


class Tracker:
    def __init__(self, bind: str, port: int, table: PeerTable, origin_port: int,
                 limits: ServerLimits | None = None):
        self.table = table
        # cluster.httpserver: the deadlines and connection bounds `catalogue serve` has (slowloris).
        self.server = SiteHTTPServer((bind, port), make_handler(table, origin_port), limits)
        self.thread = threading.Thread(target=self.server.serve_forever, name="tracker", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> "Tracker":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def announce_hashes(ti: lt.torrent_info) -> list[bytes]:
    """The 20-byte hashes a client announces a torrent under (v1, and v2 truncated)."""
    ih = ti.info_hashes()
    out = []
    if ih.has_v1():
        out.append(bytes.fromhex(str(ih.v1)))
    if ih.has_v2():
        out.append(bytes.fromhex(str(ih.v2))[:20])
    return out
