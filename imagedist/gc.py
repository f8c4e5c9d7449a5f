"""Garbage collection of the image store: never an image a running VM uses.

Removed: base images no longer endorsed (not in the accepted index, revoked, expired) or no longer
approved, and endorsed+approved versions beyond the newest `keep` of a name; images the spec's
roles name are always kept. Partial downloads are removed when no wanted entry explains them or
when untouched for `STALE_PARTIAL_SECONDS`.
"""
from __future__ import annotations

import logging
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.spec import ClusterSpec, split_image_ref
from imagedist.inuse import images_in_use, in_use
from cluster.store import Store
from imagedist.store import image_key

log = logging.getLogger(__name__)

STALE_PARTIAL_SECONDS = 24 * 3600
IMAGE_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*\.(qcow2|raw)")  # use with fullmatch


@dataclass
class GcResult:
    removed: list[Path] = field(default_factory=list)
    kept_in_use: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def spec_image_files(spec: ClusterSpec) -> set[str]:
    out = set()
    for role in spec.roles.values():
        name, version = split_image_ref(role.image)
        out |= {f"{name}-{version}.qcow2", f"{name}-{version}.raw"}
    return out


def version_key(version: str) -> tuple:
    """'1.10' after '1.9': digits compare as numbers (ties in `created` are common in a batch)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.findall(r"\d+|[^\d.+_-]+", version))


def wanted_files(spec: ClusterSpec, index, keep: int) -> dict[str, object]:
    """File name -> Entry for the endorsed, approved, unexpired entries worth keeping."""
    from catalogue.approvals import is_approved

    by_name: dict[str, list] = {}
    for e in index.entries:
        if not e.expired() and is_approved(spec, e.name, e.version):
            by_name.setdefault(e.name, []).append(e)
    out: dict[str, object] = {}
    for entries in by_name.values():
        entries.sort(key=lambda e: (e.created, version_key(e.version)), reverse=True)
        for e in entries[:keep] if keep > 0 else entries:
            out[e.file_name] = e
    return out


def _remove(path: Path, result: GcResult) -> None:
    try:
        path.unlink()
        result.removed.append(path)
        log.info("gc: removed %s", path)
    except FileNotFoundError:
        pass
    except OSError as e:
        result.notes.append(f"{path}: cannot remove: {e.strerror or e}")


def collect(spec: ClusterSpec, store: Store, index, keep: int, partials: bool) -> GcResult:
    """Removes what is no longer wanted. With `index` None (none accepted yet) base images are
    left alone: nothing says they are unwanted."""
    result = GcResult()
    if index is None:
        result.notes.append("no accepted index yet: base images left alone")
        wanted: dict[str, object] = {}
    else:
        wanted = wanted_files(spec, index, keep)
        protected = spec_image_files(spec)
        usage = images_in_use(spec, store)
        if "*" in usage:
            result.notes.append("a running job's image could not be identified: no base image removed")
        for f in sorted(store.base.glob("*")) if store.base.is_dir() else []:
            if not IMAGE_FILE_RE.fullmatch(f.name) or f.name in wanted or f.name in protected:
                continue
            if in_use(usage, f.name):
                result.kept_in_use.append(f.name)
                log.info("gc: keeping %s: a running VM uses it", f.name)
                continue
            _remove(f, result)
            stem = f.name.rsplit(".", 1)[0]
            _remove(store.torrent_file(stem), result)
            _remove(store.resume_file(stem), result)
    if partials and store.partial.is_dir():
        now = time.time()
        for f in sorted(store.partial.iterdir()):
            stem = f.name.rsplit(".", 1)[0]
            st = f.lstat()  # never follow: a (dangling) symlink here is no download of ours
            explained = stat.S_ISREG(st.st_mode) and (index is None or f.name in wanted)
            if explained and now - st.st_mtime < STALE_PARTIAL_SECONDS:
                continue
            _remove(f, result)
            _remove(store.resume_file(stem), result)
    return result


def unknown_files(store: Store, index) -> list[Path]:
    """Files under images/ that no entry of the accepted index explains."""
    known_files = {e.file_name for e in index.entries} if index else set()
    known_keys = {image_key(e.name, e.version) for e in index.entries} if index else set()
    out: list[Path] = []
    for d in (store.base, store.partial):
        out += [f for f in sorted(d.glob("*")) if f.name not in known_files] if d.is_dir() else []
    if store.torrents.is_dir():
        for f in sorted(store.torrents.glob("*")):
            stem, _, ext = f.name.rpartition(".")
            if ext not in ("torrent", "resume") or stem not in known_keys:
                out.append(f)
    images = store.images_dir
    if images.is_dir():
        known_dirs = {store.base, store.partial, store.torrents}
        out += [p for p in sorted(images.iterdir()) if p not in known_dirs]
    return out
