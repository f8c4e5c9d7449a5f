"""imgdist with real libtorrent sessions on loopback: origin + hosts, bans, resume, fallback."""
from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from cluster.spec import load_spec

MiB = 1 << 20


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def store_of(spec: Path) -> Path:
    return Path(load_spec(spec).store)


def assert_installed(spec: Path, entry) -> Path:
    path = store_of(spec) / "images" / "base" / entry.file_name
    assert path.is_file(), f"{path} not installed"
    assert sha256(path) == entry.sha256
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert not list((store_of(spec) / "images" / "partial").iterdir())
    return path


def test_origin_and_three_hosts_pull_one_image_and_all_verify(imgdist_lab):
    entry = imgdist_lab.add_image("sage", "1.0", 24, roles=("sage",))
    imgdist_lab.sign()
    imgdist_lab.start_origin()
    hosts = [imgdist_lab.host(f"h{i}", approve=("sage@1.0",)) for i in range(3)]
    procs = [imgdist_lab.spawn(h, "--sync") for h in hosts]
    for h, p in zip(hosts, procs):
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err.decode()[-3000:]
        assert "installed sage@1.0" in out.decode()
        assert_installed(h, entry)
    listing = imgdist_lab.run(hosts[0], "--list")
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith("sage "))
    assert row.split()[1:3] == ["1.0", "24"] or "1.0" in row
    assert "verified" in row and " yes " in row


def test_second_sync_is_a_no_op(imgdist_lab):
    imgdist_lab.add_image("sage", "1.0", 8)
    imgdist_lab.sign()
    imgdist_lab.start_origin()
    h = imgdist_lab.host("h0", approve=("sage@*",))
    assert imgdist_lab.run(h, "--sync").returncode == 0
    again = imgdist_lab.run(h, "--sync")
    assert again.returncode == 0, again.stderr
    assert "present   sage@1.0" in again.stdout
