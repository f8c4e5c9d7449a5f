"""Steering the swarm so the origin sends each piece about once.

Stock libtorrent on an 8-host LAN had the origin send 1.6-1.9 copies of an image: every host asked
it for the same rarest pieces. Measured fixes, combined here:
- striping: host i of n gives its own n-th of the pieces top priority, so hosts start on
  different slices and then trade them;
- gating: once its slice is complete a host stops taking pieces from the origin (unless the
  swarm goes idle, see swarm.GATE_IDLE_SECONDS);
- pacing (origin side, imagedist.origin): one peer class per host, upload limit = origin rate /
  hosts interested, because plain TCP shares the origin link very unevenly.
"""
from __future__ import annotations

from dataclasses import dataclass

OWN_PRIORITY = 7
OTHER_PRIORITY = 1
# A gated host whose peers give it nothing for this long lets the origin serve it again.
GATE_IDLE_SECONDS = 3.0


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


def slice_complete(have: list[bool], stripe: Stripe) -> bool:
    return all(have[i] for i in stripe.pieces(len(have)))


def pacing_limit(origin_rate: int, interested_hosts: int) -> int:
    """Per-host upload limit at the origin (bytes/s); 0 = unlimited."""
    if origin_rate <= 0:
        return 0
    return max(origin_rate // max(interested_hosts, 1), 16 << 10)
