"""What the origin sent more than once, and to whom: the data behind `origin_copies` above 1.

The origin counts every block it uploads (libtorrent's block_uploaded_alert) by piece and peer
address. When it stops it logs one line: how many blocks went out more than once, how many of
those repeats went to the host whose stripe the piece is in (that host asked again: a lost or
re-requested block) or to another host (a piece the swarm should have passed on), and how many
fell in the last tenth of the run (the tail). No I/O here; Origin feeds it and logs the summary.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from imagedist.steering import Stripe


@dataclass
class SendLog:
    sent: Counter = field(default_factory=Counter)  # (piece, block) -> times sent
    repeats: list[tuple[int, str, float]] = field(default_factory=list)  # (piece, ip, when) of each repeat
    first: float | None = None
    last: float = 0.0

    def record(self, piece: int, block: int, ip: str, when: float) -> None:
        self.first = when if self.first is None else self.first
        self.last = max(self.last, when)
        self.sent[(piece, block)] += 1
        if self.sent[(piece, block)] > 1:
            self.repeats.append((piece, ip, when))

    def summary(self, num_pieces: int, stripe_of: Callable[[str], Stripe | None]) -> str:
        blocks = sum(self.sent.values())
        if not blocks:
            return "sent no blocks"
        tail_from = (self.first or 0.0) + 0.9 * (self.last - (self.first or 0.0))
        owner = sum(1 for p, ip, _ in self.repeats
                    if (s := stripe_of(ip)) is not None and p in s.pieces(num_pieces))
        tail = sum(1 for _, _, t in self.repeats if t >= tail_from)
        return (f"sent {blocks} blocks, {len(self.sent)} distinct; {len(self.repeats)} repeats "
                f"({len(self.repeats) / max(len(self.sent), 1):.3f} of the image): {owner} to the piece's "
                f"stripe owner, {len(self.repeats) - owner} to other hosts; {tail} in the last tenth of the run")
