"""`imgdist list`: one row per image the index names or the store holds."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from catalogue.imagefile import suffix_format
from catalogue.qcow2 import check_image_header
from cluster.cliframe import format_size, format_table
from cluster.errors import DataError
from cluster.spec import ClusterSpec
from cluster.files import allocated_bytes
from imagedist.gc import IMAGE_FILE_RE
from cluster.files import pid_alive
from imagedist.inuse import images_in_use
from imagedist.state import read_status
from cluster.store import Store
from imagedist.store import image_key


@dataclass
class Row:
    name: str
    version: str
    size: int  # bytes of the file
    virtual: int | None  # the disk the guest sees (None: unknown)
    state: str
    endorsed: str
    approved: str
    vms: int


def _split_file(name: str) -> tuple[str, str]:
    stem = name.rsplit(".", 1)[0]
    m = re.fullmatch(r"(.+?)-([^-]+)", stem)
    return (m.group(1), m.group(2)) if m else (stem, "?")


def rows(spec: ClusterSpec, store: Store, index) -> list[Row]:
    from catalogue.approvals import is_approved

    status = read_status(store)
    live = status is not None and pid_alive(status.pid)
    usage = images_in_use(spec, store)
    out: list[Row] = []
    seen: set[str] = set()
    revoked = set(index.revoked) if index else set()
    for e in index.entries if index else []:
        seen.add(e.file_name)
        key = image_key(e.name, e.version)
        virtual = e.virtual_size if e.virtual_size is not None else _header_size(store.base / e.file_name, e.format)
        out.append(Row(e.name, e.version, e.size, virtual, _state(store, key, e.file_name, e.size, status, live),
                       "expired" if e.expired() else "yes", "yes" if is_approved(spec, e.name, e.version) else "no",
                       usage.get(e.file_name, 0)))
    for f in sorted(store.base.glob("*")) if store.base.is_dir() else []:
        if f.name in seen or not IMAGE_FILE_RE.fullmatch(f.name):
            continue
        name, version = _split_file(f.name)
        out.append(Row(name, version, f.stat().st_size, _header_size(f, suffix_format(f)), "verified",
                       "revoked" if f"{name}@{version}" in revoked else "no",
                       "yes" if is_approved(spec, name, version) else "no", usage.get(f.name, 0)))
    return out


def _header_size(path: Path, fmt: str) -> int | None:
    """The virtual size per the strict header reader, for an entry from before the index recorded
    it (or a file no index names); None when there is no such file or its header is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return check_image_header(fd, fmt, str(path))
    except DataError:
        return None
    finally:
        os.close(fd)


def _state(store: Store, key: str, file_name: str, size: int, status, live: bool) -> str:
    st = status.images.get(key) if status else None
    installed = (store.base / file_name).is_file()
    if st and st.state == "failed" and not installed:
        return f"failed: {st.error}"
    if installed:
        return "seeding" if live and st and st.state == "seeding" else "verified"
    if st and st.state in ("downloading", "checking", "verifying", "starting"):
        return f"downloading {st.percent:.0f}%" + ("" if live else " (stopped)")
    partial = store.partial / file_name
    if partial.exists():
        return f"downloading {100.0 * min(allocated_bytes(partial), size) / max(size, 1):.0f}% (stopped)"
    return "missing"


def render(rows_: list[Row]) -> str:
    head = ["NAME", "VERSION", "SIZE", "VIRTUAL", "STATE", "ENDORSED", "APPROVED", "VMS"]
    table = [[r.name, r.version, format_size(r.size), format_size(r.virtual), r.state, r.endorsed, r.approved,
              str(r.vms)] for r in rows_]
    return format_table(head, table) + "\n"
