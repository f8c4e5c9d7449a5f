"""One imgdist pass on a hypervisor: fetch and accept the index, pull what is missing, gc."""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

from cluster.errors import DataError, SalvusError
from cluster.spec import ClusterSpec
from imagedist import steering
from cluster.files import write_atomic as atomic_write
from catalogue.trust import hash_cache_path
from imagedist.install import check_space, install
from imagedist.progress import ProgressView
from imagedist.settings import SessionConfig
from imagedist.source import fetch_index, fetch_torrent, origin_ips, parse_peers
from imagedist.state import ImageStatus, Status, is_enabled, write_status
from cluster.store import Store
from imagedist.store import image_key
from imagedist.swarm import PullProgress, PullRequest, Swarm, info_hash_hex, torrent_info

log = logging.getLogger(__name__)

MiB = 1 << 20
STATUS_EVERY = 1.0  # seconds between status file updates for --list


def host_name(spec: ClusterSpec) -> str:
    return spec.hypervisor.advertise_host or socket.gethostname()


@dataclass
class Selection:
    wanted: list  # catalogue.index.Entry: approved, for this host, not expired
    skipped: dict[str, str] = field(default_factory=dict)  # NAME@VERSION -> why


def select_entries(spec: ClusterSpec, index) -> Selection:
    """The entries to pull: not expired, meant for this host, and approved for exactly the bytes
    the approval pinned (`approvals.refusal`), so imgdist never fetches what no boot would accept."""
    from catalogue.approvals import load, refusal

    sel = Selection(wanted=[])
    names = (host_name(spec), spec.site)
    approvals = load(spec)
    for e in index.entries:
        if e.expired():
            sel.skipped[e.ref] = "expired"
        elif not e.meant_for(*names):
            sel.skipped[e.ref] = f"not meant for this host ({', '.join(e.targets)})"
        elif (why := refusal(spec, e, approvals)) is not None:
            sel.skipped[e.ref] = f"not approved by this site: {why}"
        else:
            sel.wanted.append(e)
    return sel


@dataclass
class PassResult:
    installed: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    disabled: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed


class Agent:
    """imgdist on one host: a libtorrent session that pulls and seeds the store's images."""

    def __init__(self, spec: ClusterSpec, view: Callable[[list[PullProgress]], None] | None = None):
        self.spec = spec
        self.store = Store.of(spec)
        self.view = view or ProgressView()
        self.status = Status(pid=os.getpid(), updated=0.0)
        self._swarm: Swarm | None = None
        self._published = 0.0

    @property
    def swarm(self) -> Swarm:
        if self._swarm is None:
            cfg = self.spec.imgdist
            self._swarm = Swarm(SessionConfig(cfg.listen_ip, cfg.listen_port, "host"),
                                stall_timeout=float(cfg.stall_timeout))
        return self._swarm

    def listen(self) -> Swarm:
        """Starts the libtorrent session (it is otherwise started by the first pull or seed)."""
        return self.swarm

    @property
    def has_swarm(self) -> bool:
        return self._swarm is not None

    def close(self) -> None:
        if self._swarm is not None:
            self._swarm.close()
            self._swarm = None

    # -- torrents ------------------------------------------------------------------------------
    def _torrent(self, entry) -> bytes:
        """The entry's metainfo: the copy kept in images/torrents/ if it still matches, else
        fetched from the origin (and kept for seeding after a restart)."""
        key = image_key(entry.name, entry.version)
        cached = self.store.torrent_file(key)
        try:
            meta = cached.read_bytes()
            if info_hash_hex(torrent_info(meta)) == entry.info_hash:
                return meta
        except (OSError, ValueError):
            pass
        meta = fetch_torrent(self.spec, entry)
        atomic_write(cached, meta)
        return meta

    def _trackers(self) -> list[str]:
        return [self.spec.imgdist.tracker] if self.spec.imgdist.tracker else []

    def seed_installed(self, entries: list) -> None:
        """Seeds the installed images among `entries`; stops seeding everything else."""
        keep: set[str] = set()
        for e in entries:
            key = image_key(e.name, e.version)
            if not (self.store.base / e.file_name).is_file():
                continue
            try:
                meta = self._torrent(e)
            except SalvusError as err:
                log.warning("%s: not seeding: %s", key, err)
                continue
            self.swarm.seed(key, meta, self.store.base, e.file_name, self._trackers())
            keep.add(e.info_hash)
            self.status.images[key] = ImageStatus("seeding", 100.0)
        for ih in self.swarm.seeding() - keep:
            self.swarm.unseed(ih)

    def stop_seeding(self) -> None:
        if self._swarm is not None:
            self._swarm.unseed_all()
        self.status.images = {k: v for k, v in self.status.images.items() if v.state != "seeding"}

    # -- one pass ------------------------------------------------------------------------------
    def _request(self, entry, meta: bytes) -> PullRequest:
        key = image_key(entry.name, entry.version)
        stripe = steering.stripe_for(host_name(self.spec), self.spec.hypervisor.host_names)
        trackers = self._trackers()
        if stripe is not None:
            # libtorrent appends its own parameters after ours ("&info_hash=...").
            trackers = [f"{t}{'&' if '?' in t else '?'}stripe={steering.stripe_param(stripe)}" for t in trackers]
        return PullRequest(
            key=key, metainfo=meta, save_dir=self.store.partial, filename=entry.file_name,
            resume_file=self.store.resume_file(key), trackers=trackers,
            peers=parse_peers(self.spec), web_seeds=list(entry.web_seeds),
            stripe=stripe, origin_ips=origin_ips(self.spec, list(entry.web_seeds)))

    def _publish(self, progs: list[PullProgress]) -> None:
        now = time.monotonic()
        if now - self._published < STATUS_EVERY and not any(p.state in ("failed", "finished") for p in progs):
            return
        self._published = now
        for p in progs:
            st = {"finished": "verifying", "flushing": "verifying"}.get(p.state, p.state)
            if p.state == "failed":
                st = "failed"
            self.status.images[p.key] = ImageStatus(st, round(p.percent, 1), p.error, list(p.banned))
        write_status(self.store, self.status)
        self.view(progs)

    def pull(self, entries: list, result: PassResult, should_stop: Callable[[], bool] | None) -> None:
        reqs: dict[str, tuple[PullRequest, object]] = {}
        reserve = self.spec.imgdist.reserve_mb * MiB
        committed = 0
        for e in entries:
            try:
                # Each pull is checked against what earlier pulls of this pass will still write.
                check_space(self.store, e.file_name, e.size, reserve + committed)
                meta = self._torrent(e)
            except SalvusError as err:
                result.failed[e.ref] = str(err)
                self.status.images[image_key(e.name, e.version)] = ImageStatus("failed", 0.0, str(err))
                log.error("%s: %s", e.ref, err)
                continue
            committed += e.size
            req = self._request(e, meta)
            reqs[req.key] = (req, e)
        retry: list[PullRequest] = []
        for attempt in range(2):
            todo = [r for r, _ in reqs.values()] if attempt == 0 else retry
            if not todo:
                break
            retry = []
            for p in self.swarm.pull_all(todo, self._publish, should_stop):
                req, e = reqs[p.key]
                if p.state != "finished":
                    result.failed[e.ref] = p.error or p.state
                    continue
                try:
                    t_verify = time.monotonic()
                    install(self.store, e, hash_cache_path(self.spec))
                except DataError as err:
                    if attempt == 0:
                        # Resume data can claim pieces whose writes were lost (host crash):
                        # drop it so libtorrent rechecks the partial file and re-fetches.
                        log.warning("%s: %s; rechecking and pulling again", e.ref, err)
                        req.resume_file.unlink(missing_ok=True)
                        retry.append(req)
                    else:
                        result.failed[e.ref] = str(err)
                        self.status.images[p.key] = ImageStatus("failed", 100.0, str(err))
                    continue
                req.resume_file.unlink(missing_ok=True)
                result.installed.append(e.ref)
                self.swarm.seed(p.key, req.metainfo, self.store.base, e.file_name, self._trackers())
                self.status.images[p.key] = ImageStatus("seeding", 100.0, "", list(p.banned))
                log.info("%s: installed (%.1f s: swarm %.1f, flush %.1f, verify+install %.1f; "
                         "%d MiB fetched, %d MiB resumed%s%s)", e.ref, time.monotonic() - p.started,
                         p.complete - p.started, p.ended - p.complete, time.monotonic() - t_verify,
                         p.downloaded // MiB, p.resumed // MiB,
                         f", banned {', '.join(p.banned)}" if p.banned else "",
                         ", web seed used" if p.web_seed_used else "")
        write_status(self.store, self.status)

    def sync_pass(self, do_gc: bool = True, should_stop: Callable[[], bool] | None = None,
                  keep: int | None = None) -> PassResult:
        from imagedist.gc import collect

        result = PassResult()
        self.store.open().ensure_images()
        if not is_enabled(self.store):
            result.disabled = True
            self.stop_seeding()
            write_status(self.store, self.status)
            return result
        index = fetch_index(self.spec)
        sel = select_entries(self.spec, index)
        result.skipped = sel.skipped
        missing = [e for e in sel.wanted if not (self.store.base / e.file_name).is_file()]
        result.present = [e.ref for e in sel.wanted if e not in missing]
        self.seed_installed(sel.wanted)
        if missing:
            log.info("pulling %s", ", ".join(e.ref for e in missing))
            self.pull(missing, result, should_stop)
        if do_gc:
            gc = collect(self.spec, self.store, index,
                         keep=self.spec.imgdist.keep_versions if keep is None else keep, partials=True)
            result.removed = [str(p) for p in gc.removed]
        write_status(self.store, self.status)
        return result
