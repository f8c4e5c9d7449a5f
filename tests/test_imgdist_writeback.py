"""A pull writes its partial file back to disk as it goes, so install's fsync has little left.

Real libtorrent sessions in this process (an origin seeding at a capped rate, one host pulling),
with the sync call wrapped to record which files it was given and when.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import libtorrent as lt

from catalogue.torrent import make_torrent
from imagedist import swarm as swarm_mod
from imagedist.settings import SessionConfig, set_upload_limit
from imagedist.swarm import PullRequest, Swarm

MiB = 1 << 20


def test_partial_file_is_synced_while_it_is_pulled(tmp_path, monkeypatch):
    seed_dir, pull_dir = tmp_path / "origin", tmp_path / "partial"
    seed_dir.mkdir()
    image = seed_dir / "img-1.qcow2"
    image.write_bytes(os.urandom(32 * MiB))
    meta, _ = make_torrent(image, "http://127.0.0.1:9/images/", piece_size=256 << 10)

    synced: list[tuple[float, Path, bool]] = []
    real = swarm_mod.fsync_path
    lock = threading.Lock()

    def recording(path: Path, *args, **kwargs) -> None:
        with lock:
            synced.append((time.monotonic(), path, path.exists()))
        real(path, *args, **kwargs)

    monkeypatch.setattr(swarm_mod, "fsync_path", recording)
    origin = Swarm(SessionConfig("127.0.0.1", 0, "origin"))
    host = Swarm(SessionConfig("127.0.0.1", 0, "host"))
    try:
        origin.seed("img-1", meta, seed_dir, image.name)
        # 8 MiB/s: the 32 MiB pull (4x what libtorrent holds in memory before writing) takes about
        # 4 s, several writeback periods. Loopback peers are in libtorrent's local class, which the
        # global limit does not cover.
        set_upload_limit(origin.session, origin.session.local_peer_class_id, "local", 8 * MiB)
        req = PullRequest(key="img-1", metainfo=meta, save_dir=pull_dir, filename=image.name,
                          resume_file=tmp_path / "img-1.resume",
                          peers=[("127.0.0.1", origin.session.listen_port())])
        progress = host.start(req)
        deadline = time.monotonic() + 60
        while progress.state not in ("finished", "failed") and time.monotonic() < deadline:
            host.pump()
            origin.pump(0.01)
        assert progress.state == "finished", progress.error
        partial = pull_dir / image.name
        during = [t for t, path, existed in synced if path == partial and existed and t < progress.complete]
        assert len(during) >= 2, synced
        with open(partial, "rb") as f:
            assert hashlib.file_digest(f, "sha256").digest() == hashlib.sha256(image.read_bytes()).digest()
    finally:
        host.close()
        origin.close()
