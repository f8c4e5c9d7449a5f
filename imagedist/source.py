"""What imgdist fetches from the catalogue origin: the signed index and the torrents it names."""
from __future__ import annotations

import logging
import socket
from urllib.parse import urlsplit

from cluster.errors import DataError, SpecError
from cluster.spec import ClusterSpec
from imagedist.settings import is_loopback

log = logging.getLogger(__name__)

def origin_url(spec: ClusterSpec) -> str:
    if not spec.catalogue.url:
        raise SpecError(f"{spec.source}: catalogue.url: required by imgdist (the origin serving "
                        "index.yaml, its signature and the images)")
    return spec.catalogue.url.rstrip("/") + "/"


def fetch_index(spec: ClusterSpec):
    """Fetches index.yaml + index.yaml.sig and accepts them (signature, expiry, rollback)."""
    from catalogue.fetch import fetch_signed_index
    from catalogue.trust import accept_index  # the catalogue owns every trust decision

    raw, sig = fetch_signed_index(origin_url(spec), spec.catalogue.max_index_bytes)
    return accept_index(spec, raw, sig)


def fetch_torrent(spec: ClusterSpec, entry) -> bytes:
    """The entry's torrent, refused unless its info hash is the one the signed index names."""
    from catalogue.fetch import fetch_bytes, origin_file_url
    from catalogue.torrent import MAX_TORRENT_BYTES, check_torrent

    # The index model checks the path already; checked again where it becomes a URL, since an
    # entry may come from elsewhere and a name that leaves the origin must never be fetched.
    directory, sep, name = str(entry.torrent).partition("/")
    if (directory, sep) != ("torrents", "/"):
        raise DataError(f"torrent {str(entry.torrent)[:120]!r}: expected 'torrents/NAME-VERSION.torrent' "
                        "on the origin")
    url = origin_file_url(origin_url(spec), "torrents", name, what="torrent")
    meta = fetch_bytes(url, MAX_TORRENT_BYTES)
    check_torrent(entry, meta, source=url)
    return meta


def parse_peers(spec: ClusterSpec) -> list[tuple[str, int]]:
    out = []
    for i, p in enumerate(spec.imgdist.peers):
        host, sep, port = p.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise SpecError(f"{spec.source}: imgdist.peers[{i}]: expected HOST:PORT, got {p!r}")
        out.append((host.strip("[]"), int(port)))
    return out


def origin_ips(spec: ClusterSpec, web_seeds: list[str]) -> frozenset[str]:
    """The origin's addresses (tracker and web seed hosts), for gating. A loopback address counts
    only for a host that listens on an address of its own: a host listening on every address
    reaches its peers on one machine from 127.0.0.1 too, so that address is not the origin's."""
    ips: set[str] = set()
    for url in [spec.imgdist.tracker or "", *web_seeds]:
        host = urlsplit(url).hostname
        if not host:
            continue
        try:
            for info in socket.getaddrinfo(host, None, socket.AF_INET):
                ips.add(info[4][0])
        except OSError:
            continue
    own = spec.imgdist.listen_ip
    distinct = own not in ("0.0.0.0", "::")
    return frozenset(ip for ip in ips if ip != own and (distinct or not is_loopback(ip)))
