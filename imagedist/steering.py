"""Steering the swarm so the origin sends each piece about once.

Stock libtorrent makes every host ask the origin for the same rarest pieces, so the origin sends
most pieces several times. The fixes, combined here (figures in the README's benchmark section):
- striping: host i of n gives its own n-th of the pieces top priority, so hosts start on
  different slices and then trade them;
- only-at-origin pieces are not wanted: while a host takes its own slice from the origin, another
  slice's piece that no peer has yet gets priority 0, so the host never asks the origin for it
  (libtorrent would fill its deep request queue at the origin with pieces next to its slice, which
  the host owning that slice is fetching at the same time: sent twice);
- gating: once its slice is complete a host stops taking pieces from the origin (unless the
  swarm goes idle, see swarm.GATE_IDLE_SECONDS);
- pacing (origin side, imagedist.origin): one peer class per host (up to 28, then shared), because
  plain TCP shares the origin link very unevenly. The origin rate is split in proportion to what
  each host still lacks of its own slice (the origin knows listed hosts' stripes by address; others
  tell the tracker theirs): with an even split a host whose downlink is crowded by its peers falls
  behind, and the whole swarm then waits for its slice.
"""
from __future__ import annotations

from dataclasses import dataclass

OWN_PRIORITY = 7
OTHER_PRIORITY = 1
# A gated host whose peers give it nothing for this long lets the origin serve it again. At 3 s,
# 32 hosts' gates lifted in the tail while their peers' uplinks were merely full, and the origin
# sent 0.027 of the image again (imagedist.sendlog); at 8 s it sent 0.003, the swarm no slower.
GATE_IDLE_SECONDS = 8.0


@dataclass(frozen=True)
class Stripe:
    index: int  # this host's position among the site's hosts
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"stripe index {self.index} outside 0..{self.count - 1}")

    def pieces(self, num_pieces: int) -> range:
        lo = num_pieces * self.index // self.count
        hi = num_pieces * (self.index + 1) // self.count
        return range(lo, hi)


def stripe_for(host: str, hosts: list[str]) -> Stripe | None:
    """This host's stripe from the site's host list; None when it is not listed (no steering)."""
    if host not in hosts or len(hosts) < 2:
        return None
    return Stripe(hosts.index(host), len(hosts))


def stripe_priorities(num_pieces: int, stripe: Stripe) -> list[int]:
    own = stripe.pieces(num_pieces)
    return [OWN_PRIORITY if i in own else OTHER_PRIORITY for i in range(num_pieces)]


def steered_priorities(availability: list[int], origins: int, stripe: Stripe) -> list[int]:
    """Piece priorities while a host still takes its own slice from the origin.

    `availability` is libtorrent's per-piece count of connected sources, `origins` how many of
    those sources are origin seeds (they hold every piece). Another slice's piece counts only once
    some peer holds it: until then its own host is fetching it from the origin, and fetching it
    here too would make the origin send it twice.
    """
    own = stripe.pieces(len(availability))
    return [OWN_PRIORITY if i in own else OTHER_PRIORITY if n > origins else 0
            for i, n in enumerate(availability)]


def slice_complete(have: list[bool], stripe: Stripe) -> bool:
    return all(have[i] for i in stripe.pieces(len(have)))


MIN_PACE = 16 << 10  # bytes/s: a host with nothing of its own left still gets its last blocks


def stripe_param(stripe: Stripe) -> str:
    """How a host tells the tracker its stripe (an extra announce parameter)."""
    return f"{stripe.index}/{stripe.count}"


def parse_stripe(text: str) -> Stripe | None:
    try:
        index, count = (int(x) for x in text.split("/"))
        return Stripe(index, count)
    except ValueError:
        return None


def missing_in_stripe(have: list[bool], stripe: Stripe) -> int:
    return sum(1 for i in stripe.pieces(len(have)) if not have[i])


def cap_wants(rows: list[tuple[str, int | None]], num_pieces: int) -> list[tuple[str, int | None]]:
    """Caps what each interested host lacks at an even share of the torrent's pieces among them.

    An honest host's stripe is never larger (the site has at least as many hosts as are
    interested), so a host that claims a larger stripe (`stripe=0/1`) wins at most a fair share.
    """
    if not rows or num_pieces <= 0:
        return rows
    cap = -(-num_pieces // len(rows))
    return [(ip, None if w is None else min(w, cap)) for ip, w in rows]


def pacing_limits(origin_rate: int, wants: list[tuple[str, int | None]]) -> dict[str, int]:
    """Per-IP upload limits at the origin (bytes/s); empty when the origin is not paced.

    `wants` has one row per interested host: its IP and how many pieces of its own stripe it still
    lacks, or None when it is not steered (it then weighs as much as the average steered host).
    Hosts sharing an IP (one machine) share its class, so their shares add up.
    """
    if origin_rate <= 0 or not wants:
        return {}
    known = [w for _, w in wants if w is not None]
    default = sum(known) / len(known) if known and sum(known) > 0 else 1.0
    weights = [(ip, float(default if w is None else w)) for ip, w in wants]
    total = sum(w for _, w in weights)
    if total <= 0:  # every steered host has its slice: an even split
        weights, total = [(ip, 1.0) for ip, _ in wants], float(len(wants))
    out: dict[str, float] = {}
    for ip, w in weights:
        out[ip] = out.get(ip, 0.0) + origin_rate * w / total
    return {ip: max(int(v), MIN_PACE) for ip, v in out.items()}
