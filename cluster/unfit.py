"""Hosts marked unfit for site-network jobs, a shared-state kind of the registry.

A wrapper that finds its host without the site bridge exits 75 and marks the host (`mark`), so
submissions place `network: site` jobs elsewhere (Slurm `--exclude`, an HTCondor requirement)
instead of sending them back to a host that will only fail them again; `salvus_jobs network up` on
the host, or a site job that gets past the check there, clears the mark (`clear`). A row is
`unfit-hosts` / HOST -> {"reason": TEXT, "since": EPOCH}. Rows are anyone's writing: `read` keeps
only hosts of the spec's hypervisor.hosts, so a forged row can at most exclude a real host (what
`network down` would do too), never inject text into a job script.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass

from cluster.registry.base import Registry
from cluster.spec import ClusterSpec

log = logging.getLogger(__name__)

KIND = "unfit-hosts"
MAX_REASON = 300  # one line of `status`; a wrapper's reason is far shorter


@dataclass(frozen=True)
class UnfitHost:
    host: str
    reason: str
    since: float  # epoch seconds of the (latest) mark


def mark(registry: Registry, host: str, reason: str, now: float | None = None) -> None:
    registry.write_state(KIND, host, json.dumps({"reason": reason[:MAX_REASON],
                                                 "since": time.time() if now is None else now}))


def clear(registry: Registry, host: str) -> bool:
    """Removes `host`'s mark; True when there was one (no write when there is none: every site job
    checks on start, and a remote registry need not see a delete per job)."""
    if host not in registry.read_state(KIND):
        return False
    registry.write_state(KIND, host, None)
    return True


def parse(spec: ClusterSpec, rows: dict[str, str]) -> list[UnfitHost]:
    """The valid rows, by host name; the others are logged and ignored."""
    known = set(spec.hypervisor.host_names)
    out = []
    for host, value in sorted(rows.items()):
        try:
            d = json.loads(value)
            reason, since = d["reason"], d["since"]
            if host not in known:
                raise ValueError("not a host of hypervisor.hosts")
            if not isinstance(reason, str) or len(reason) > MAX_REASON:
                raise ValueError("reason")
            if type(since) not in (int, float) or not math.isfinite(since):
                raise ValueError("since")
        except (ValueError, TypeError, KeyError) as e:
            log.warning("ignoring unreadable %s row %r: %s", KIND, host[:80], e)
            continue
        out.append(UnfitHost(host, reason, float(since)))
    return out


def read(spec: ClusterSpec, registry: Registry) -> list[UnfitHost]:
    return parse(spec, registry.read_state(KIND))
