"""libtorrent session settings for hosts and the origin, and per-host peer classes.

The choices follow what was measured on a LAN of hypervisors (see the project notes): TCP only
(uTP's delay-based congestion control backs off on a busy LAN), no DHT/LSD/UPnP/NAT-PMP (peers come from our tracker or the spec), several
connections per IP (hosts on one machine share 127.0.0.1), and `initial_picker_threshold=0` so the
steering priorities apply from the first piece instead of after a few random picks.
"""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Literal

import libtorrent as lt

log = logging.getLogger(__name__)

Role = Literal["host", "origin"]

USER_AGENT = "imgdist/0.1"

ALERT_MASK = (lt.alert_category.error | lt.alert_category.status | lt.alert_category.storage
              | lt.alert_category.peer | lt.alert_category.tracker | lt.alert_category.ip_block)


@dataclass(frozen=True)
class SessionConfig:
    listen_ip: str = "0.0.0.0"
    listen_port: int = 6881
    role: Role = "host"


def session_settings(cfg: SessionConfig) -> dict:
    s: dict = {
        "listen_interfaces": f"{cfg.listen_ip}:{cfg.listen_port}",
        "user_agent": USER_AGENT,
        "alert_mask": int(ALERT_MASK),
        "alert_queue_size": 10000,
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "enable_incoming_utp": False,
        "enable_outgoing_utp": False,
        "allow_multiple_connections_per_ip": True,
        "initial_picker_threshold": 0,
        # A stalled swarm is noticed by our watchdog; libtorrent should retry peers quickly.
        "min_reconnect_time": 1,
        # libtorrent's internal tick (500 ms by default) hands out bandwidth quota and starts
        # connections; a shorter tick brings the origin to full rate sooner after a pull starts.
        "tick_interval": 100,
        "peer_connect_timeout": 5,
        "min_announce_interval": 2,
        "tracker_completion_timeout": 10,
        "tracker_receive_timeout": 5,
        "announce_to_all_trackers": True,
        # The ip filter gates and bans peers; the tracker lives on the (gated) origin.
        "apply_ip_filter_to_trackers": False,
        # libtorrent 2.1 keeps up to this much written data in memory before flushing; 100 MiB by
        # default, which a SIGKILL loses (and a resume file would claim). Flush early instead.
        "max_queued_disk_bytes": 8 << 20,
        # Hashing is the CPU cost of a pull; more threads than cores only adds switching.
        "hashing_threads": 1,
        "aio_threads": 2,
        "active_downloads": -1,
        "active_seeds": -1,
        "active_limit": -1,
        "dont_count_slow_torrents": False,
        # Fewer requests in flight per peer: near the end of its slice a host otherwise queues
        # seconds' worth of other hosts' pieces at the origin, which then sends them twice.
        "request_queue_time": 1,
        # Large socket buffers: fewer system calls per byte (for sending, only the origin's).
        "recv_socket_buffer_size": 1 << 20,
        "unchoke_slots_limit": -1,
    }
    if cfg.listen_ip not in ("0.0.0.0", "::"):
        # Connections leave from the address we listen on, so peers (and the origin's pacing and
        # ip filters, which go by address) see one address per host on a multi-homed machine.
        s["outgoing_interfaces"] = cfg.listen_ip
    if cfg.role == "host":
        # A host's HAVE and REQUEST messages queue behind the piece data already in its send
        # buffers, so deep buffers delay every hop of a piece through the swarm. Small buffers keep
        # requested blocks in libtorrent's request queue, where a HAVE overtakes them.
        s["send_socket_buffer_size"] = 64 << 10
        s["send_buffer_watermark"] = 128 << 10
        s["send_buffer_watermark_factor"] = 10
        # Steering leaves a host with no wanted piece for a moment when its own slice completes
        # (the rest only at the origin was priority 0): libtorrent then counts it finished and, by
        # default, drops its connections to peers that are done, which came back seconds later.
        s["close_redundant_connections"] = False
    else:
        s["send_socket_buffer_size"] = 1 << 20
        s["send_buffer_watermark"] = 1 << 20
        s["choking_algorithm"] = 0  # fixed slots; the origin paces per host with peer classes
        # Paced peers get their quota once per tick, so every tick the origin writes a tick's
        # worth of its rate at once (240 KB at 20 Mbit/s and 100 ms): more than a small switch
        # queue holds. Shorter ticks send the same rate in smaller bursts.
        s["tick_interval"] = 25
        s["close_redundant_connections"] = True
        # Every block it uploads, for its send log (imagedist.sendlog).
        s["alert_mask"] = int(ALERT_MASK | lt.alert_category.upload)
    return s


def make_session(cfg: SessionConfig) -> lt.session:
    params = lt.session_params()
    params.settings = session_settings(cfg)
    return lt.session(params)


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def set_upload_limit(ses: lt.session, peer_class: int, label: str, limit: int) -> None:
    """Sets one peer class's upload limit (bytes/s, 0 = none).

    The 2.1.1 bindings fill the keys a dict leaves out with garbage (connections then get refused
    as "too many"), so every key is passed.
    """
    ses.set_peer_class(peer_class, {
        "ignore_unchoke_slots": False,
        "connection_limit_factor": 100,
        "label": label,
        "upload_limit": int(limit),
        "download_limit": 0,
        "upload_priority": 1,
        "download_priority": 1,
    })
