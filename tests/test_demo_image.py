"""The demo image builder's output, inspected without booting (the VM tests boot it)."""
from __future__ import annotations

import json
import os
import stat
import subprocess

from jobwrappers.demo_image import GUEST_DIR, find_kernel, module_load_order


def test_image_files_are_read_only_and_well_formed(demo_image):
    for p in demo_image.paths():
        assert stat.S_IMODE(p.stat().st_mode) == 0o444, p
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(demo_image.disk)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and "backing-filename" not in info
    assert info["actual-size"] < 16 << 20, "the base should stay a few MiB"
    with open(demo_image.kernel, "rb") as f:
        head = f.read(4096)
    assert head.startswith(b"\x7fELF"), "the kernel must be the uncompressed ELF (PVH entry)"


def test_initramfs_loads_modules_after_their_dependencies(demo_image):
    listing = subprocess.run(["cpio", "-t", "--quiet"], stdin=open(demo_image.initrd, "rb"),
                             capture_output=True, text=True, check=True).stdout.split()
    assert {"init", "bin/busybox", "modules.order"} <= set(listing)
    _, moddir = find_kernel()
    order = [p.name for p in module_load_order(moddir)]
    for needed, before in (("virtio_blk.ko", "virtio_ring.ko"), ("ext4.ko", "jbd2.ko"),
                           ("virtio_net.ko", "failover.ko"), ("isofs.ko", "cdrom.ko")):
        assert order.index(before) < order.index(needed)
        assert f"modules/{needed}" in listing


def test_root_filesystem_holds_the_guest_scripts(demo_image, tmp_path):
    raw = tmp_path / "root.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(demo_image.disk), str(raw)], check=True)
    ls = subprocess.run(["debugfs", "-R", "ls -p /etc/salvus/roles", str(raw)],
                        capture_output=True, text=True, check=True).stdout
    for role in ("sage", "hub", "cassandra"):
        assert f"/{role}/" in ls
    cat = subprocess.run(["debugfs", "-R", "cat /etc/inittab", str(raw)],
                         capture_output=True, text=True, check=True).stdout
    assert cat == (GUEST_DIR / "inittab").read_text()


def test_guest_sage_script_evaluates_only_integer_expressions():
    """The sage service script itself, run by busybox on the host."""
    out = subprocess.run(["busybox", "sh", str(GUEST_DIR / "roles" / "sage")],
                         input="6*7\n(1+2)*-3\n2**62\n1/0\n$(id)\nx=1\n", capture_output=True,
                         text=True, timeout=10, env={**os.environ, "PATH": os.environ["PATH"]}).stdout
    assert out.splitlines() == ["42", "-9", str(2 ** 62), "error: cannot evaluate",
                                "error: expected an integer expression", "error: expected an integer expression"]
