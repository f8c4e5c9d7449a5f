"""Persistent on/off switch and the live status a running pass publishes for `--list`."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from cluster.files import write_atomic as atomic_write
from cluster.store import Store

MAX_STATE_BYTES = 1 << 20


def is_enabled(store: Store) -> bool:
    try:
        data = json.loads(store.runtime.imgdist_enabled.read_bytes()[:MAX_STATE_BYTES])
    except FileNotFoundError:
        return True  # a new host takes part unless told otherwise
    except ValueError:
        return False  # damaged: the safe reading of an explicit switch is "off"
    return bool(data.get("enabled", False)) if isinstance(data, dict) else False


def set_enabled(store: Store, enabled: bool) -> None:
    atomic_write(store.runtime.imgdist_enabled, json.dumps(
        {"enabled": enabled, "changed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode() + b"\n")


@dataclass
class ImageStatus:
    state: str  # downloading | verifying | seeding | failed
    percent: float = 0.0
    error: str = ""
    banned: list[str] = field(default_factory=list)


@dataclass
class Status:
    pid: int
    updated: float
    images: dict[str, ImageStatus] = field(default_factory=dict)  # key NAME-VERSION


def write_status(store: Store, status: Status) -> None:
    status.updated = time.time()
    atomic_write(store.runtime.imgdist_status, json.dumps(asdict(status), sort_keys=True).encode())


def read_status(store: Store) -> Status | None:
    try:
        data = json.loads(store.runtime.imgdist_status.read_bytes()[:MAX_STATE_BYTES])
        return Status(pid=int(data["pid"]), updated=float(data["updated"]),
                      images={k: ImageStatus(**v) for k, v in data.get("images", {}).items()})
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
