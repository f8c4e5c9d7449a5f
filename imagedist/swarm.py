"""Pulls and seeds images in one libtorrent session.

What this adds on top of libtorrent, each because of something seen on this machine:
- a progress watchdog: a swarm whose only source was banned for a bad piece stalls without any
  error, so no progress for `stall_timeout` first adds the web seeds, then fails the pull;
- resume data saved every 5 seconds (a SIGKILLed pull continues where it was), discarded when it is
  older than the last boot (it may list pieces whose writes never reached the disk);
- a pull is only "done" after `remove_torrent` + `torrent_removed_alert`: reading the file at
  `torrent_finished_alert` gave wrong bytes while writes were still queued;
- steering (imagedist.steering): each host starts on its own slice, wants another slice's piece
  only once a peer holds it, and stops taking pieces from the origin once its slice is complete.
"""
from __future__ import annotations

import logging
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import libtorrent as lt

from imagedist import steering
from cluster.files import write_atomic as atomic_write
from cluster.files import boot_time, fsync_path
from imagedist.settings import SessionConfig, make_session

log = logging.getLogger(__name__)

# Each save flushes libtorrent's writes and fsyncs the resume file, which costs CPU on every host;
# 5 s of progress is what a SIGKILL may cost.
RESUME_EVERY = 5.0
PUMP_SECONDS = 0.2
# A pull leaves its image dirty in the page cache (a hypervisor's memory is far above the kernel's
# background writeback threshold), so install's fsync used to write the whole image at once: eight
# hosts finishing together queued 2 GiB on the disk (1.9 s to sync here), and each install waited
# 0.1-0.4 s for its fsync after hashing. Synced every second while it is pulled, the file has about
# a second's worth left at install (waits of 0.00 s). This writes pages; it never reads the image.
WRITEBACK_EVERY = 1.0


@dataclass
class PullRequest:
    key: str  # NAME-VERSION: log and file names
    metainfo: bytes  # the .torrent, whose info hash the caller checked against the signed index
    save_dir: Path  # images/partial
    filename: str  # the file's name in save_dir, whatever the torrent calls it
    resume_file: Path
    trackers: list[str] = field(default_factory=list)
    peers: list[tuple[str, int]] = field(default_factory=list)
    web_seeds: list[str] = field(default_factory=list)
    stripe: steering.Stripe | None = None
    origin_ips: frozenset[str] = frozenset()


@dataclass
class PullProgress:
    key: str
    total: int
    state: str = "starting"  # checking | downloading | flushing | finished | failed
    done: int = 0
    rate: float = 0.0  # payload bytes/s
    downloaded: int = 0  # payload bytes fetched by this process
    resumed: int = 0  # bytes already present when the pull started
    hash_failures: int = 0
    banned: list[str] = field(default_factory=list)
    web_seed_used: bool = False
    error: str = ""
    started: float = field(default_factory=time.monotonic)
    complete: float = 0.0  # every piece verified (still to be flushed)
    ended: float = 0.0  # removed from the session: the file is complete on disk

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0

    @property
    def path_ok(self) -> bool:
        return self.state == "finished"


@dataclass
class _Active:
    req: PullRequest
    handle: lt.torrent_handle
    progress: PullProgress
    info_hash: str
    last_progress: float
    stall_timeout: float
    num_pieces: int = 0
    best: int = 0  # high-water mark of bytes done: a failed piece's blocks are counted, then dropped
    gated: bool = False
    gate_lifted: bool = False
    priorities: list[int] = field(default_factory=list)
    fallback_at: float = 0.0


def torrent_info(metainfo: bytes) -> lt.torrent_info:
    """Parses a single-file image torrent (anything else is refused: an image is one file).

    v2 torrents may carry a tail pad file after the image; it is never downloaded.
    """
    try:
        ti = lt.torrent_info(metainfo)
    except RuntimeError as e:
        raise ValueError(f"not a valid torrent: {e}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # files() is the only per-file view
        fs = ti.files()
        real = [i for i in range(fs.num_files()) if not fs.file_flags(i) & lt.file_storage.flag_pad_file]
    if real != [0]:
        raise ValueError(f"torrent holds {len(real)} files, expected exactly one image (the first)")
    return ti


def image_size(ti: lt.torrent_info) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return ti.files().file_size(0)


def info_hash_hex(ti: lt.torrent_info) -> str:
    """The hash an index names a torrent by: v2 (SHA-256) when present, else v1."""
    ih = ti.info_hashes()
    return str(ih.v2) if ih.has_v2() else str(ih.v1)


def _write_back(files: list[Path]) -> None:
    for f in files:
        try:
            fsync_path(f, data_only=True)
        except FileNotFoundError:
            continue  # libtorrent has not written a block yet
        except OSError as e:  # install's own fsync reports a real disk problem
            log.debug("%s: background writeback: %s", f, e)


def _alert_hash(ih) -> str:
    return str(ih.v2) if ih.has_v2() else str(ih.v1)


class Swarm:
    """One libtorrent session: images being pulled and images being seeded."""

    def __init__(self, cfg: SessionConfig, stall_timeout: float = 60.0,
                 gate_idle: float = steering.GATE_IDLE_SECONDS):
        self.session = make_session(cfg)
        self.stall_timeout = stall_timeout
        self.gate_idle = gate_idle
        self._active: dict[str, _Active] = {}
        self._removing: dict[str, _Active] = {}
        self._seeds: dict[str, lt.torrent_handle] = {}
        self._own_ips = {cfg.listen_ip} | ({"127.0.0.1"} if cfg.listen_ip == "0.0.0.0" else set())
        self._banned_ips: set[str] = set()
        # The origin's count of what it sends (imagedist.sendlog); hosts leave it None.
        self.on_upload: Callable[[lt.block_uploaded_alert], None] | None = None
        self._filtered: frozenset[str] = frozenset()
        self._last_resume = 0.0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="writeback")
        self._writing: Future | None = None
        self._last_writeback = 0.0

    # -- seeding ---------------------------------------------------------------------------------
    def seed(self, key: str, metainfo: bytes, save_dir: Path, filename: str,
             trackers: list[str] | None = None) -> None:
        """Seeds an installed image. seed_mode: libtorrent checks each piece's hash the first
        time it sends it, so a file damaged after install is not served."""
        ti = torrent_info(metainfo)
        ih = info_hash_hex(ti)
        if ih in self._seeds:
            return
        atp = self._params(ti, save_dir, filename, trackers or [])
        atp.flags |= lt.torrent_flags.seed_mode
        self._seeds[ih] = self.session.add_torrent(atp)
        log.info("seeding %s", key)

    def seeding(self) -> set[str]:
        return set(self._seeds)

    def unseed(self, info_hash: str) -> None:
        h = self._seeds.pop(info_hash, None)
        if h is not None and h.is_valid():
            self.session.remove_torrent(h)

    def unseed_all(self) -> None:
        for ih in list(self._seeds):
            self.unseed(ih)

    # -- pulling ---------------------------------------------------------------------------------
    def start(self, req: PullRequest) -> PullProgress:
        ti = torrent_info(req.metainfo)
        ih = info_hash_hex(ti)
        atp = self._load_resume(req, ti) or self._params(ti, req.save_dir, req.filename, [])
        # This pass's trackers, not the resume data's: the spec (or this host's stripe) may have changed.
        atp.trackers = list(req.trackers)
        # Web seeds come only from the signed index and only when the swarm stalls (or there is
        # nothing else): they load the origin, which the swarm exists to spare.
        atp.flags |= lt.torrent_flags.override_web_seeds
        atp.url_seeds = []
        atp.flags &= ~lt.torrent_flags.seed_mode
        atp.flags &= ~lt.torrent_flags.paused
        atp.flags &= ~lt.torrent_flags.auto_managed
        req.save_dir.mkdir(parents=True, exist_ok=True)
        h = self.session.add_torrent(atp)
        prog = PullProgress(key=req.key, total=image_size(ti))
        act = _Active(req, h, prog, ih, time.monotonic(), self.stall_timeout, num_pieces=ti.num_pieces())
        if req.stripe:
            self._set_priorities(act, steering.stripe_priorities(act.num_pieces, req.stripe))
            own = req.stripe.pieces(ti.num_pieces())
            log.info("%s: starting on pieces %d-%d of %d (host %d of %d)%s", req.key, own.start,
                     own.stop - 1, ti.num_pieces(), req.stripe.index + 1, req.stripe.count,
                     f"; origin {', '.join(sorted(req.origin_ips))} gated after that" if req.origin_ips else "")
        for ip, port in req.peers:
            h.connect_peer((ip, port))
        if not req.trackers and not req.peers:
            self._fall_back_to_web_seeds(act, "no peers configured")
        self._active[ih] = act
        return prog

    def pull_all(self, reqs: list[PullRequest],
                 on_progress: Callable[[list[PullProgress]], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> list[PullProgress]:
        """Pulls every request to completion or failure; the session keeps seeding meanwhile."""
        progs = [self.start(r) for r in reqs]
        while self._active or self._removing:
            self.pump()
            if on_progress:
                on_progress(progs)
            if should_stop and should_stop():
                self.abort_all("stopped")
                break
        return progs

    def abort_all(self, reason: str) -> None:
        """Stops every pull; partial files and resume data stay for the next run."""
        for act in list(self._active.values()):
            self._save_resume_now(act)
            self._fail(act, reason)
        self._drain_removals(10.0)

    def pump(self, timeout: float = PUMP_SECONDS) -> None:
        self.session.wait_for_alert(int(timeout * 1000))
        for a in self.session.pop_alerts():
            self._on_alert(a)
        now = time.monotonic()
        for act in list(self._active.values()):
            self._tick(act, now)
        if now - self._last_resume >= RESUME_EVERY:
            self._last_resume = now
            for act in self._active.values():
                # flush_disk_cache: the resume data must not list pieces still only in memory.
                act.handle.save_resume_data(lt.torrent_handle.only_if_modified
                                            | lt.torrent_handle.flush_disk_cache)
        if now - self._last_writeback >= WRITEBACK_EVERY and (self._writing is None or self._writing.done()):
            self._last_writeback = now
            files = [a.req.save_dir / a.req.filename for a in self._active.values()]
            if files:
                self._writing = self._writer.submit(_write_back, files)
        self._apply_gate()

    def close(self) -> None:
        self.abort_all("closing")
        self.unseed_all()
        self._writer.shutdown(wait=True)
        del self.session

    # -- internals -------------------------------------------------------------------------------
    def _params(self, ti: lt.torrent_info, save_dir: Path, filename: str,
                trackers: list[str]) -> lt.add_torrent_params:
        atp = lt.add_torrent_params()
        atp.ti = ti
        atp.save_path = str(save_dir)
        atp.renamed_files = {0: filename}
        atp.trackers = list(trackers)
        atp.flags &= ~lt.torrent_flags.auto_managed
        atp.flags &= ~lt.torrent_flags.paused
        atp.flags |= lt.torrent_flags.override_web_seeds
        atp.url_seeds = []
        return atp

    def _load_resume(self, req: PullRequest, ti: lt.torrent_info) -> lt.add_torrent_params | None:
        f = req.resume_file
        try:
            st = f.stat()
        except FileNotFoundError:
            return None
        if st.st_mtime < boot_time():
            log.info("%s: resume data predates this boot; rechecking the partial file", req.key)
            f.unlink(missing_ok=True)
            return None
        try:
            atp = lt.read_resume_data(f.read_bytes())
        except RuntimeError as e:
            log.warning("%s: unreadable resume data (%s); rechecking the partial file", req.key, e)
            return None
        if _alert_hash(atp.info_hashes) != info_hash_hex(ti):
            log.warning("%s: resume data is for another torrent; ignoring it", req.key)
            return None
        atp.ti = ti
        atp.save_path = str(req.save_dir)
        atp.renamed_files = {0: req.filename}
        log.info("%s: resuming from saved state", req.key)
        return atp

    def _on_alert(self, a) -> None:
        if isinstance(a, lt.save_resume_data_alert):
            act = self._active.get(_alert_hash(a.handle.info_hashes())) if a.handle.is_valid() else None
            if act is not None:
                atomic_write(act.req.resume_file, lt.write_resume_data_buf(a.params))
        elif isinstance(a, lt.hash_failed_alert):
            act = self._by_handle(a.handle)
            if act:
                act.progress.hash_failures += 1
                log.warning("%s: piece %d failed its hash check; fetching it from another source",
                            act.req.key, a.piece_index)
        elif isinstance(a, lt.peer_ban_alert):
            act = self._by_handle(a.handle)
            ep = f"{a.endpoint[0]}:{a.endpoint[1]}"
            if act and ep not in act.progress.banned:
                act.progress.banned.append(ep)
                log.warning("%s: banned peer %s (sent a piece that failed its hash)", act.req.key, ep)
            # libtorrent bans the (ip, port) entry, which an incoming reconnection from a new port
            # escapes; a host's own IP is blocked outright unless it is ours (all of loopback).
            if a.endpoint[0] not in self._own_ips:
                self._banned_ips.add(a.endpoint[0])
        elif isinstance(a, lt.url_seed_alert):
            log.warning("web seed %s: %s", getattr(a, "server_url", "?"), a.message())
        elif isinstance(a, (lt.torrent_error_alert, lt.file_error_alert)):
            act = self._by_handle(a.handle)
            if act:
                self._fail(act, a.message())
        elif isinstance(a, lt.torrent_removed_alert):
            act = self._removing.pop(_alert_hash(a.info_hashes), None)
            if act is not None:
                act.progress.ended = time.monotonic()
                if act.progress.state == "flushing":
                    act.progress.state = "finished"
        elif isinstance(a, lt.tracker_error_alert):
            log.debug("tracker: %s", a.message())
        elif isinstance(a, lt.block_uploaded_alert) and self.on_upload is not None:
            self.on_upload(a)

    def _by_handle(self, h: lt.torrent_handle) -> _Active | None:
        if not h.is_valid():
            return None
        return self._active.get(_alert_hash(h.info_hashes()))

    def _tick(self, act: _Active, now: float) -> None:
        want_pieces = bool(act.req.stripe and act.req.origin_ips and not act.gated and not act.gate_lifted)
        # The piece bitfield only when steering needs it: it is a Python list per call.
        st = act.handle.status(lt.torrent_handle.query_pieces if want_pieces else 0)
        p = act.progress
        if st.state in (lt.torrent_status.checking_files, lt.torrent_status.checking_resume_data):
            p.state = "checking"
            act.last_progress = now
            p.resumed = min(st.total_done, p.total)
            return
        if p.state in ("starting", "checking"):
            p.resumed = min(st.total_done, p.total)
            p.state = "downloading"
        # Every piece, wanted or not: steering sets some to priority 0 for a while.
        if st.total_done > act.best:
            act.best = st.total_done
            act.last_progress = now
        p.done = min(st.total_done, p.total)
        p.rate = float(st.download_payload_rate)
        p.downloaded = st.total_payload_download
        # Not is_finished: that is every *wanted* piece, and steering leaves some unwanted for a
        # while (a pull that ended there installed an image with holes, caught by the hash).
        if st.is_seeding:
            self._finish(act)
            return
        if want_pieces:
            if steering.slice_complete(st.pieces, act.req.stripe):
                act.gated = True
                # The origin is gated from here on: every piece is again wanted from the peers.
                self._set_priorities(act, steering.stripe_priorities(act.num_pieces, act.req.stripe))
                lacking = st.pieces.count(False)
                log.info("%s: own slice complete; taking the rest (%d pieces) from peers",
                         act.req.key, lacking)
            else:
                self._want_only_pieces_peers_hold(act)
        idle = now - act.last_progress
        if act.gated and idle >= self.gate_idle:
            act.gated, act.gate_lifted = False, True
            log.info("%s: peers idle for %.0f s; the origin may serve again", act.req.key, idle)
        if idle >= act.stall_timeout:
            if act.req.web_seeds and not p.web_seed_used:
                self._fall_back_to_web_seeds(act, f"no progress for {idle:.0f} s")
                act.last_progress = now
            else:
                self._fail(act, f"stalled: no progress for {idle:.0f} s"
                                + (" (web seed tried)" if p.web_seed_used else " (no web seed)"))

    def _set_priorities(self, act: _Active, priorities: list[int]) -> None:
        if priorities != act.priorities:
            act.handle.prioritize_pieces(priorities)
            act.priorities = priorities

    def _want_only_pieces_peers_hold(self, act: _Active) -> None:
        origins = sum(1 for p in act.handle.get_peer_info()
                      if p.ip[0] in act.req.origin_ips and p.flags & lt.peer_info.seed)
        self._set_priorities(act, steering.steered_priorities(act.handle.piece_availability(),
                                                              origins, act.req.stripe))

    def _fall_back_to_web_seeds(self, act: _Active, why: str) -> None:
        act.progress.web_seed_used = True
        act.gated, act.gate_lifted = False, True
        if act.req.stripe:  # anything from anyone now
            self._set_priorities(act, steering.stripe_priorities(act.num_pieces, act.req.stripe))
        for url in act.req.web_seeds:
            act.handle.add_url_seed(url)
        if act.req.web_seeds:
            log.warning("%s: %s; using the web seed %s", act.req.key, why, ", ".join(act.req.web_seeds))

    def _apply_gate(self) -> None:
        """One session-wide IP filter: banned hosts always; the origin while every steered pull
        has its own slice (ip filters are per session, and a host pulls one image at a time)."""
        steered = [a for a in self._active.values() if a.req.origin_ips]
        gate = frozenset().union(*(a.req.origin_ips for a in steered)) \
            if steered and all(a.gated for a in steered) else frozenset()
        want = frozenset(self._banned_ips) | gate
        if want != self._filtered:
            f = lt.ip_filter()
            for ip in want:
                f.add_rule(ip, ip, 1)
            self.session.set_ip_filter(f)
            self._filtered = want

    def _save_resume_now(self, act: _Active) -> None:
        if act.handle.is_valid():
            act.handle.save_resume_data(lt.torrent_handle.flush_disk_cache)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                a = self.session.wait_for_alert(500)
                if a is None:
                    continue
                done = False
                for al in self.session.pop_alerts():
                    if isinstance(al, lt.save_resume_data_alert) and al.handle == act.handle:
                        atomic_write(act.req.resume_file, lt.write_resume_data_buf(al.params))
                        done = True
                    elif isinstance(al, lt.save_resume_data_failed_alert) and al.handle == act.handle:
                        done = True
                    else:
                        self._on_alert(al)
                if done:
                    return

    def _finish(self, act: _Active) -> None:
        act.progress.complete = time.monotonic()
        act.progress.state = "flushing"
        act.progress.done = act.progress.total
        self._remove(act)

    def _fail(self, act: _Active, reason: str) -> None:
        if act.progress.state in ("failed", "finished", "flushing"):
            return
        act.progress.state = "failed"
        act.progress.error = reason
        log.error("%s: %s", act.req.key, reason)
        self._remove(act)

    def _remove(self, act: _Active) -> None:
        self._active.pop(act.info_hash, None)
        if act.handle.is_valid():
            self._removing[act.info_hash] = act
            self.session.remove_torrent(act.handle)
        else:
            act.progress.ended = time.monotonic()

    def _drain_removals(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._removing and time.monotonic() < deadline:
            self.session.wait_for_alert(200)
            for a in self.session.pop_alerts():
                self._on_alert(a)
