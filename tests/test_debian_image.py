"""The real Debian 12 test image (jobwrappers/debian_image.py): built once per recipe, cached, with
cloud-init, sshd, its own kernel and the sage service, and no SSH host keys baked in."""
from __future__ import annotations

import json
import subprocess

import pytest

from jobwrappers import debian_image

pytestmark = pytest.mark.slow  # debootstrap: minutes on a new machine, then cached


@pytest.fixture(scope="session")
def image():
    return debian_image.build()


def _debugfs(raw, command: str) -> str:
    return subprocess.run(["debugfs", "-R", command, str(raw)], capture_output=True, text=True, check=True).stdout


def test_image_is_a_compressed_qcow2_with_kernel_and_initrd(image):
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image.disk)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] >= 1 << 30
    assert info["actual-size"] < info["virtual-size"] // 4  # compressed, not a 2 GiB copy
    assert "backing-filename" not in info
    assert image.kernel.read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage's setup header
    assert image.initrd.stat().st_size > 1 << 20


def test_image_holds_cloud_init_sshd_and_the_sage_service_but_no_host_keys(image, tmp_path):
    raw = tmp_path / "root.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image.disk), str(raw)], check=True)
    ssh = _debugfs(raw, "ls -p /etc/ssh")
    assert "sshd_config" in ssh and "ssh_host_" not in ssh
    assert "cloud-init" in _debugfs(raw, "ls -p /usr/bin")
    unit = _debugfs(raw, "cat /etc/systemd/system/salvus-sage.service")
    assert f"TCP-LISTEN:{debian_image.SAGE_PORT}" in unit
    assert "salvus-sage.service" in _debugfs(raw, "ls -p /etc/systemd/system/multi-user.target.wants")


def test_a_second_build_reuses_the_cache(image):
    before = image.disk.stat().st_mtime_ns
    again = debian_image.build()
    assert again == image and again.disk.stat().st_mtime_ns == before


def test_recipe_change_gives_a_new_cache_key(monkeypatch):
    key = debian_image.recipe_key()
    monkeypatch.setattr(debian_image, "PACKAGES", debian_image.PACKAGES + ("curl",))
    assert debian_image.recipe_key() != key


def test_whole_disk_is_the_same_system_on_a_gpt_with_its_own_bootloaders(image, tmp_path):
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image.whole_disk)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["actual-size"] < info["virtual-size"] // 4
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image.whole_disk), str(raw)], check=True)
    parts = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]["partitions"]
    esp, root = parts
    assert "LegacyBIOSBootable" in esp["attrs"] and root["uuid"].lower() == debian_image.ROOT_PARTUUID
    entry = subprocess.run(["mtype", "-i", f"{raw}@@{esp['start'] * 512}", "::/loader/entries/salvus.conf"],
                           capture_output=True, text=True, check=True).stdout
    assert f"options {debian_image.WHOLE_DISK_CMDLINE}\n" in entry
    assert image.kernel_release.startswith("6.") and image.kernel.name == "vmlinuz"
    rootfs = tmp_path / "root.ext4"
    with open(raw, "rb") as f, open(rootfs, "wb") as out:
        f.seek(root["start"] * 512)
        out.write(f.read(root["size"] * 512))
    # fstab by label: the same filesystem is /dev/vda (direct boot) and /dev/vda2 (this disk).
    assert _debugfs(rootfs, "cat /etc/fstab").startswith("LABEL=root / ext4 ")


def test_a_build_removes_only_other_recipes_images(tmp_path):
    keep, old, stray = tmp_path / "debian12-0123456789abcdef", tmp_path / "debian12-fedcba9876543210", tmp_path / "debian12-x"
    for d in (keep, old, stray):
        d.mkdir()
        (d / "debian12.qcow2").write_bytes(b"x")
    debian_image.prune_other_recipes(tmp_path, keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == [keep.name, stray.name]
