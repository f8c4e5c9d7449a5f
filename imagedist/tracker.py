"""A tiny HTTP BitTorrent tracker (BEP 3 announce, BEP 23 compact peers) run by the origin.

Hand-written because libtorrent has no tracker side and Debian's opentracker serves only
info-hashes whitelisted at build/config time; ours answers for exactly the torrents the origin
seeds, and lists the origin itself first (it seeds every image).
"""
from __future__ import annotations

import ipaddress
import logging
import random
import socket
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import libtorrent as lt

from cluster.httpserver import ServerLimits, SiteHTTPServer
from cluster.spec import HostSpec
from imagedist.steering import Stripe, parse_stripe

log = logging.getLogger(__name__)

ANNOUNCE_INTERVAL = 10
PEER_TTL = 3 * ANNOUNCE_INTERVAL
MAX_PEERS = 200
# Ports one IP may hold in one torrent's peer list (a new one evicts its oldest): a few hosts on
# one machine (tests, a hypervisor with two stores) fit, but one machine announcing many ports
# cannot fill every peer list and keep the real hosts out of it.
MAX_PORTS_PER_IP = 8

Endpoint = tuple[str, int]


@dataclass
class SiteHosts:
    """What the origin knows of the site's hosts (`hypervisor.hosts`): address -> stripe, None for
    an address several entries share (one machine). With `only`, other addresses are refused."""

    stripes: dict[str, Stripe | None] = field(default_factory=dict)
    only: bool = False

    @classmethod
    def from_spec(cls, hosts: list[HostSpec], only: bool = False) -> "SiteHosts":
        out: dict[str, Stripe | None] = {}
        for i, h in enumerate(hosts):
            ip = h.ip
            if ip is not None:
                # The stripe the host computes itself (steering.stripe_for: its place in this list).
                out[ip] = None if ip in out or len(hosts) < 2 else Stripe(i, len(hosts))
        return cls(out, only)


class _Swarm:
    """One torrent's peers: a list (a random sample costs the sample, not the swarm) and the same
    endpoints in order of their last announce (pruning pops only the stale front). A peer's
    claimed stripe lives and goes with its entry, so the table never holds more than its peers."""

    def __init__(self) -> None:
        self.seen: OrderedDict[Endpoint, float] = OrderedDict()
        self.eps: list[Endpoint] = []
        self.pos: dict[Endpoint, int] = {}
        self.ports: dict[str, OrderedDict[int, None]] = {}
        self.claims: dict[Endpoint, Stripe] = {}

    def __len__(self) -> int:
        return len(self.eps)

    def touch(self, ep: Endpoint, now: float) -> None:
        if ep in self.seen:
            self.seen[ep] = now
            self.seen.move_to_end(ep)
            self.ports[ep[0]].move_to_end(ep[1])
            return
        ports = self.ports.get(ep[0])
        if ports is not None and len(ports) >= MAX_PORTS_PER_IP:
            self.drop((ep[0], next(iter(ports))))
        self.ports.setdefault(ep[0], OrderedDict())[ep[1]] = None
        self.seen[ep] = now
        self.pos[ep] = len(self.eps)
        self.eps.append(ep)

    def drop(self, ep: Endpoint) -> None:
        if self.seen.pop(ep, None) is None:
            return
        i = self.pos.pop(ep)
        last = self.eps.pop()
        if last != ep:
            self.eps[i] = last
            self.pos[last] = i
        ports = self.ports[ep[0]]
        del ports[ep[1]]
        if not ports:
            del self.ports[ep[0]]
        self.claims.pop(ep, None)

    def prune(self, now: float) -> None:
        while self.seen:
            ep, seen = next(iter(self.seen.items()))
            if now - seen <= PEER_TTL:
                break
            self.drop(ep)

    def sample(self, k: int, exclude: Endpoint, rng: random.Random) -> list[Endpoint]:
        picks = rng.sample(range(len(self.eps)), min(len(self.eps), k + 1))
        return [self.eps[i] for i in picks if self.eps[i] != exclude][:k]


@dataclass
class PeerTable:
    """info-hash (20 bytes as announced) -> the peers announcing it, and the hosts' stripes."""

    known: set[bytes] = field(default_factory=set)
    peers: dict[bytes, _Swarm] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Called (outside the lock) with the IP of every admitted announce that is not "stopped": the
    # pacer gives a new host its peer class before the host can connect, and sees it is alive.
    on_announce: Callable[[str], None] | None = None
    site: SiteHosts = field(default_factory=SiteHosts)
    rng: random.Random = field(default_factory=random.Random)

    def refusal(self, ip: str) -> str | None:
        """Why an announce from `ip` is refused (imgdist.tracker_hosts_only), else None."""
        if self.site.only and ip not in self.site.stripes:
            return "not one of the site's hosts (hypervisor.hosts)"
        return None

    def note_stripe(self, ep: Endpoint, stripe: Stripe | None) -> None:
        """The stripe a host named in its announce (`stripe=i/n`), kept by address because
        libtorrent announces and handshakes under different peer ids. Used only when `site` knows
        no address: a host could claim any stripe (the pacer caps what a claim can win)."""
        if self.site.stripes:
            return  # the origin places listed hosts itself and takes no host's word
        with self.lock:
            for swarm in self.peers.values():
                if stripe is None:
                    swarm.claims.pop(ep, None)
                elif ep in swarm.seen:
                    swarm.claims[ep] = stripe

    def stripes_by_ip(self, now: float | None = None) -> dict[str, Stripe | None]:
        """IP -> the stripe of the host there; None when hosts sharing the IP (one machine, as in
        tests) have different ones. For the pacer's every update."""
        if self.site.stripes:
            return dict(self.site.stripes)
        now = time.time() if now is None else now
        seen: dict[str, set[Stripe]] = {}
        with self.lock:
            # A claim counts while its host announces: one that died draws no share of the origin.
            for swarm in self.peers.values():
                for ep, stripe in swarm.claims.items():
                    if now - swarm.seen[ep] <= PEER_TTL:
                        seen.setdefault(ep[0], set()).add(stripe)
        return {ip: next(iter(found)) if len(found) == 1 else None for ip, found in seen.items()}

    def stripe_of(self, ip: str, now: float | None = None) -> Stripe | None:
        return self.stripes_by_ip(now).get(ip)

    def allow(self, info_hashes: list[bytes]) -> None:
        with self.lock:
            self.known.update(info_hashes)

    def announce(self, ih: bytes, ep: Endpoint, stopped: bool, now: float) -> list[Endpoint] | None:
        """The peers to tell `ep` (a random sample of at most MAX_PEERS), None for an unknown hash."""
        with self.lock:
            if ih not in self.known:
                return None
            swarm = self.peers.setdefault(ih, _Swarm())
            swarm.prune(now)
            if stopped:
                swarm.drop(ep)
            else:
                swarm.touch(ep, now)
            others = swarm.sample(MAX_PEERS, ep, self.rng)
        if not stopped and self.on_announce:
            try:
                self.on_announce(ep[0])
            except Exception as e:  # the host must get its answer whatever the pacer does
                log.warning("tracker: pacing %s failed: %s", ep[0], e)
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
            refused = table.refusal(ip)
            if refused:
                self._reply({b"failure reason": refused.encode()})
                return
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
            # paces it by what it still lacks of that slice (its own placement of listed hosts wins).
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
