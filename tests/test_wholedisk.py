"""The whole-disk layout (jobwrappers/wholedisk.py) on small inputs: a GPT with the ESP marked for
BIOS boot, both bootloaders and their configs on the ESP, the root filesystem's exact bytes in
partition 2, syslinux's GPT MBR code before the partition table. Booting such disks is
tests/test_firmware.py's (demo) and tests/test_real_firmware.py's (Debian)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cluster.errors import SpecError
from jobwrappers.wholedisk import ESP_TYPE, GPTMBR, SECTOR, BootEntry, build_whole_disk

PARTUUID = "5a1705e5-0000-4000-8000-00000000abcd"


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("wholedisk")
    (d / "tree").mkdir()
    (d / "tree" / "hello").write_text("root filesystem\n")
    root = d / "root.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(d / "tree"), str(root), "8M"], check=True)
    (d / "vmlinuz").write_bytes(b"kernel" * 1000)
    (d / "initrd.img").write_bytes(b"initrd" * 1000)
    entry = BootEntry(d / "vmlinuz", d / "initrd.img", "console=ttyS0 root=PARTUUID=%s rw" % PARTUUID)
    return build_whole_disk(root, entry, d / "disk.raw", esp_mb=40, root_partuuid=PARTUUID), root


def _esp_file(disk: Path, start: int, name: str) -> bytes:
    return subprocess.run(["mtype", "-i", f"{disk}@@{start * SECTOR}", f"::/{name}"], capture_output=True,
                          check=True).stdout


def test_gpt_has_a_bios_bootable_esp_and_the_root_partition(disk):
    raw, root = disk
    table = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    esp, part = table["partitions"]
    assert table["label"] == "gpt" and esp["type"] == ESP_TYPE and "LegacyBIOSBootable" in esp["attrs"]
    assert part["uuid"].lower() == PARTUUID and part["size"] * SECTOR == root.stat().st_size
    with open(raw, "rb") as f:
        assert f.read(440) == GPTMBR.read_bytes()[:440]
        f.seek(part["start"] * SECTOR)
        assert f.read(root.stat().st_size) == root.read_bytes()  # the filesystem's exact bytes


def test_esp_holds_kernel_initrd_and_both_bootloaders(disk):
    raw, _ = disk
    start = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]["partitions"][0]["start"]
    assert _esp_file(raw, start, "vmlinuz") == b"kernel" * 1000
    assert _esp_file(raw, start, "initrd.img") == b"initrd" * 1000
    assert _esp_file(raw, start, "EFI/BOOT/BOOTX64.EFI")[:2] == b"MZ"  # systemd-boot, a PE binary
    assert _esp_file(raw, start, "ldlinux.sys")  # syslinux, installed through mtools
    cmdline = f"console=ttyS0 root=PARTUUID={PARTUUID} rw"
    assert f"APPEND {cmdline}\n" in _esp_file(raw, start, "syslinux.cfg").decode()
    assert f"options {cmdline}\n" in _esp_file(raw, start, "loader/entries/salvus.conf").decode()


@pytest.mark.parametrize("cmdline", ["", "root=/dev/vda2\nDEFAULT evil", "a\rb"])
def test_a_command_line_that_is_not_one_line_is_refused_before_anything_is_written(tmp_path, cmdline):
    entry = BootEntry(tmp_path / "k", tmp_path / "i", cmdline)
    with pytest.raises(SpecError, match="kernel command line .*: expected one non-empty line"):
        build_whole_disk(tmp_path / "root.ext4", entry, tmp_path / "disk.raw")
    assert list(tmp_path.iterdir()) == []
