"""imgdist on one host: what it pulls (approval, enable), disk space, gc, classad, listing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from cluster.spec import load_spec

MiB = 1 << 20


def store_of(spec: Path) -> Path:
    return Path(load_spec(spec).store)


def base_files(spec: Path) -> list[str]:
    d = store_of(spec) / "images" / "base"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


@pytest.fixture
def two_images(imgdist_lab):
    """sage@1.0 and hub@1.0 endorsed; pulled from the web seed (no tracker, no peers)."""
    sage = imgdist_lab.add_image("sage", "1.0", 8, roles=("sage",))
    hub = imgdist_lab.add_image("hub", "1.0", 8, roles=("hub",))
    imgdist_lab.sign()
    return sage, hub


def test_unapproved_entry_is_not_pulled(imgdist_lab, two_images):
    sage, hub = two_images
    h = imgdist_lab.host("h0", approve=("sage@1.0",), tracker=False)
    r = imgdist_lab.run(h, "--sync")
    assert r.returncode == 0, r.stderr
    assert "installed sage@1.0" in r.stdout
    assert "skipped   hub@1.0: not approved by this site" in r.stdout
    assert base_files(h) == [sage.file_name]
    assert not list((store_of(h) / "images" / "partial").iterdir())
    rows = {line.split()[0]: line for line in imgdist_lab.run(h, "--list").stdout.splitlines()[1:]}
    assert rows["hub"].split()[-2:] == ["no", "0"] and "missing" in rows["hub"]
    assert "verified" in rows["sage"]


def test_disabled_host_pulls_nothing(imgdist_lab, two_images):
    h = imgdist_lab.host("h0", approve=("sage@*", "hub@*"), tracker=False)
    assert imgdist_lab.run(h, "--disable").returncode == 0
    r = imgdist_lab.run(h, "--sync")
    assert r.returncode == 0, r.stderr
    assert "disabled" in r.stdout
    assert base_files(h) == []
    assert not (store_of(h) / "images" / "partial").exists() or not list((store_of(h) / "images" / "partial").iterdir())
    assert 'SalvusImgdist = "disabled"' in imgdist_lab.run(h, "--classad").stdout
    assert imgdist_lab.run(h, "--enable").returncode == 0
    r = imgdist_lab.run(h, "--sync")
    assert r.returncode == 0, r.stderr
    assert len(base_files(h)) == 2


def test_full_disk_refuses_cleanly(imgdist_lab, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    entry = imgdist_lab.add_image("sage", "1.0", 24)
    imgdist_lab.sign()
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)], check=True)
    try:
        h = imgdist_lab.host("h0", approve=("sage@1.0",), tracker=False)
        spec = h.read_text().replace(f"store: {store_of(h)}", f"store: {small}/store")
        h.write_text(spec)
        from catalogue.approvals import approve
        approve(load_spec(h), "sage@1.0")
        r = imgdist_lab.run(h, "--sync")
        assert r.returncode != 0
        err = [line for line in r.stderr.splitlines() if line.startswith("imgdist: sage@1.0")]
        assert err and "only" in err[0] and "MiB free; not pulling" in err[0], r.stderr
        assert not list((small / "store" / "images" / "partial").iterdir())
        assert not list((small / "store" / "images" / "base").iterdir())
        assert entry.file_name in imgdist_lab.run(h, "--list").stdout
    finally:
        subprocess.run(["umount", str(small)], check=True)


def _qemu_overlay(base: Path, overlay: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay)],
                   check=True)


def _paused_qemu(overlay: Path) -> subprocess.Popen:
    """A real QEMU with the overlay (and so its backing base image) open, its CPU never started."""
    return subprocess.Popen(["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-S",
                             "-blockdev", f"driver=qcow2,node-name=root,file.driver=file,"
                                          f"file.filename={overlay}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_open(pid: int, path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if any(os.readlink(f) == str(path) for f in Path(f"/proc/{pid}/fd").iterdir()):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"QEMU {pid} never opened {path}")


def test_gc_never_removes_an_image_a_running_vm_uses(imgdist_lab, tmp_path):
    old = imgdist_lab.add_image("sage", "0.9", 8)
    new = imgdist_lab.add_image("sage", "1.0", 8)
    imgdist_lab.sign()
    h = imgdist_lab.host("h0", approve=("sage@*",), tracker=False)
    assert imgdist_lab.run(h, "--sync").returncode == 0
    assert base_files(h) == sorted([old.file_name, new.file_name])
    store = store_of(h)
    old_base = store / "images" / "base" / old.file_name
    # A VM started before the role moved to sage@1.0: its wrapper's status file (as the wrapper
    # writes it: the role, no image) and its QEMU running from an overlay on the old base.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    _qemu_overlay(old_base, scratch / "root.qcow2")
    wrapper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    vm = _paused_qemu(scratch / "root.qcow2")
    try:
        _wait_open(vm.pid, old_base)
        (store / "state" / "jobs").mkdir(parents=True, exist_ok=True)
        (store / "state" / "jobs" / "sage-7.json").write_text(json.dumps({
            "service_id": "sage-7", "role": "sage", "job_id": "7", "pid": wrapper.pid, "state": "running",
            "endpoint": "127.0.0.1:6000", "console_log": str(store / "logs" / "console" / "sage-7.log"),
            "started": time.time()}))
        rows = {line.split()[1]: line for line in imgdist_lab.run(h, "--list").stdout.splitlines()[1:]}
        assert rows["0.9"].split()[-1] == "1" and rows["1.0"].split()[-1] == "1"
        r = imgdist_lab.run(h, "--gc", "--keep", "1")
        assert r.returncode == 0, r.stderr
        assert f"kept    {old.file_name}: in use by a running VM" in r.stdout
        assert base_files(h) == sorted([old.file_name, new.file_name])
    finally:
        for p in (vm, wrapper):
            p.kill()
            p.wait()
    r = imgdist_lab.run(h, "--gc", "--keep", "1")
    assert r.returncode == 0, r.stderr
    assert f"removed {old_base}" in r.stdout
    assert base_files(h) == [new.file_name]
    assert not (store / "images" / "torrents" / "sage-0.9.torrent").exists()


def test_classad_parses_and_names_the_installed_images(imgdist_lab, two_images):
    import classad2

    h = imgdist_lab.host("h0", approve=("sage@1.0", "hub@1.0"), tracker=False)
    assert imgdist_lab.run(h, "--sync").returncode == 0
    out = imgdist_lab.run(h, "--classad").stdout
    ad = classad2.parseOne(out)
    assert sorted(ad["SalvusImages"].split(",")) == ["hub-1.0", "sage-1.0"]
    assert ad["HasSalvusImage_sage"] is True and ad["HasSalvusImage_hub"] is True
    assert ad["SalvusImgdist"] == "enabled"
    assert imgdist_lab.run(h, "--slurm-features").stdout.strip() == "salvus_img_hub_v1_d0,salvus_img_sage_v1_d0"


def test_an_expired_index_advertises_no_image(imgdist_lab):
    """The wrapper refuses to boot from an expired index (65): a host must not be matched by it."""
    import classad2

    from catalogue.endorse import CatalogueDir, sign_index
    from catalogue.index import now_utc
    from catalogue.keys import load_private_key
    from tests.fixtures.imgdist_lab import PASSPHRASE

    imgdist_lab.add_image("sage", "1.0", 1, roles=("sage",))
    index = sign_index(CatalogueDir(imgdist_lab.cat_dir), load_private_key(imgdist_lab.key, PASSPHRASE),
                       timedelta(seconds=15))  # fresh through the three commands below, on a busy machine too
    h = imgdist_lab.host("h0", approve=("sage@1.0",), tracker=False)
    assert imgdist_lab.run(h, "sync").returncode == 0
    assert classad2.parseOne(imgdist_lab.run(h, "classad").stdout)["SalvusImages"] == "sage-1.0"
    assert imgdist_lab.run(h, "slurm-features").stdout.strip() == "salvus_img_sage_v1_d0"
    while now_utc() < index.expires:
        time.sleep(0.2)
    ad = classad2.parseOne(imgdist_lab.run(h, "classad").stdout)
    assert ad["SalvusImages"] == "" and "HasSalvusImage_sage" not in ad
    r = imgdist_lab.run(h, "slurm-features")
    assert r.returncode == 0 and r.stdout == "\n"
    assert base_files(h) == ["sage-1.0.qcow2"]  # still installed, only no longer offered


def test_list_unknown_files_names_only_what_no_index_explains(imgdist_lab, two_images):
    h = imgdist_lab.host("h0", approve=("sage@1.0",), tracker=False)
    assert imgdist_lab.run(h, "--sync").returncode == 0
    stray = store_of(h) / "images" / "base" / "mystery-3.qcow2"
    stray.write_bytes(b"x")
    out = imgdist_lab.run(h, "--list_unknown_files").stdout.split()
    assert out == [str(stray)]
