"""Lays out a whole-disk image, as a site's cloud image is: a GPT with an EFI system partition that
holds the kernel, the initrd and two bootloaders, and the root filesystem as the second partition.
One disk boots both ways:

- BIOS (SeaBIOS): syslinux's `gptmbr.bin` in the protective MBR starts the partition marked
  LegacyBIOSBootable, whose boot sector and `ldlinux.sys` (installed by the mtools-based `syslinux`)
  read `syslinux.cfg`.
- UEFI (OVMF): systemd-boot at the removable-media path `EFI/BOOT/BOOTX64.EFI` (so no NVRAM boot
  entry is needed) reads `loader/entries/salvus.conf`.

Everything is done on files, without loop devices, mounts or root: `mkfs.fat -C` makes the FAT
filesystem in a file, mtools fills it, `sfdisk` writes the partition table into the disk file and the
two filesystems are copied in at their partitions' offsets. grub is not used: its BIOS install
expects a block device.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import SpecError, TempFailure

log = logging.getLogger(__name__)

SECTOR = 512
FIRST_LBA = 2048  # 1 MiB: the usual alignment, and room for the primary GPT
GPT_BACKUP_SECTORS = 34
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
GPTMBR = Path("/usr/lib/syslinux/mbr/gptmbr.bin")
SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
# Installed by scripts/setup (10-apt-vm): the package to name when a tool is missing.
TOOLS = {"mkfs.fat": "dosfstools", "mmd": "mtools", "mcopy": "mtools", "syslinux": "syslinux",
         "sfdisk": "fdisk"}


@dataclass(frozen=True)
class BootEntry:
    """What both bootloaders start: a kernel and initrd (copied onto the ESP) and its command line."""

    kernel: Path
    initrd: Path
    cmdline: str


def _run(*argv: str | Path, stdin: str | None = None) -> None:
    name = str(argv[0])
    try:
        proc = subprocess.run([str(a) for a in argv], input=stdin, capture_output=True, text=True)
    except FileNotFoundError:
        raise SpecError(f"{name} not installed (package {TOOLS.get(name, name)}: run scripts/setup)") from None
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise TempFailure(f"{name} failed (exit {proc.returncode}): {tail}")


def _check_cmdline(cmdline: str) -> None:
    # One line in two config files: a newline would add directives to them.
    if not cmdline or any(c in cmdline for c in "\n\r\0"):
        raise SpecError(f"kernel command line {cmdline!r}: expected one non-empty line")


def _esp(entry: BootEntry, dest: Path, size_mb: int) -> None:
    """The EFI system partition's FAT32 filesystem, in a file of its own."""
    for f in (GPTMBR, SYSTEMD_BOOT):
        if not f.is_file():
            raise SpecError(f"{f} missing (packages syslinux-common, systemd-boot-efi: run scripts/setup)")
    _run("mkfs.fat", "-C", "-F", "32", "-n", "ESP", dest, str(size_mb * 1024))
    img = ["-i", str(dest)]
    _run("mmd", *img, "::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries")
    files = {
        "syslinux.cfg": ("DEFAULT salvus\nPROMPT 0\nTIMEOUT 0\nLABEL salvus\n  LINUX /vmlinuz\n"
                         f"  INITRD /initrd.img\n  APPEND {entry.cmdline}\n"),
        "loader/loader.conf": "default salvus.conf\ntimeout 0\n",
        "loader/entries/salvus.conf": f"title salvus\nlinux /vmlinuz\ninitrd /initrd.img\noptions {entry.cmdline}\n",
    }
    staging = dest.with_name(dest.name + ".files")
    staging.mkdir()
    try:
        for rel, text in files.items():
            (staging / rel.replace("/", "_")).write_text(text)
            _run("mcopy", *img, staging / rel.replace("/", "_"), f"::/{rel}")
    finally:
        shutil.rmtree(staging)
    _run("mcopy", *img, entry.kernel, "::/vmlinuz")
    _run("mcopy", *img, entry.initrd, "::/initrd.img")
    _run("mcopy", *img, SYSTEMD_BOOT, "::/EFI/BOOT/BOOTX64.EFI")
    _run("syslinux", "--install", dest)  # boot sector + ldlinux.sys/.c32, through mtools


def _copy_into(src: Path, disk: Path, offset: int) -> None:
    """`src` written into `disk` at byte `offset`, holes kept as holes (the filesystems are sparse)."""
    with open(src, "rb") as i, open(disk, "r+b") as o:
        o.seek(offset)
        while chunk := i.read(1 << 20):
            if chunk.count(0) == len(chunk):
                o.seek(len(chunk), os.SEEK_CUR)
            else:
                o.write(chunk)


def build_whole_disk(root_fs: Path, entry: BootEntry, dest: Path, *, esp_mb: int = 128,
                     root_partuuid: str | None = None) -> Path:
    """A raw whole-disk image at `dest`: partition 1 the ESP (BIOS and UEFI bootloaders, kernel,
    initrd), partition 2 the bytes of `root_fs` (GPT partition UUID `root_partuuid`, else random).
    The guest sees them as /dev/vda1 and /dev/vda2; `entry.cmdline` must name the root partition
    (root=/dev/vda2, or root=PARTUUID=... with an initramfs)."""
    _check_cmdline(entry.cmdline)
    esp = dest.with_name(dest.name + ".esp")
    _esp(entry, esp, esp_mb)
    try:
        esp_sectors = esp.stat().st_size // SECTOR
        root_sectors = -(-root_fs.stat().st_size // SECTOR)
        root_start = FIRST_LBA + esp_sectors
        total = root_start + root_sectors + GPT_BACKUP_SECTORS
        total = -(-total // FIRST_LBA) * FIRST_LBA  # a whole number of MiB
        with open(dest, "wb") as f:
            f.truncate(total * SECTOR)
        _run("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", dest, stdin=(
            f"label: gpt\nfirst-lba: {FIRST_LBA}\n"
            f'start={FIRST_LBA}, size={esp_sectors}, type={ESP_TYPE}, name="ESP", attrs="LegacyBIOSBootable"\n'
            f'start={root_start}, size={root_sectors}, type={LINUX_TYPE}, name="root"'
            + (f", uuid={uuid.UUID(root_partuuid)}" if root_partuuid else "") + "\n"))
        _copy_into(esp, dest, FIRST_LBA * SECTOR)
        _copy_into(root_fs, dest, root_start * SECTOR)
        mbr = GPTMBR.read_bytes()[:440]  # boot code only: the partition table after it stays
        with open(dest, "r+b") as f:
            f.write(mbr)
    finally:
        esp.unlink(missing_ok=True)
    log.info("laid out %s: ESP %d MiB, root %d MiB", dest, esp_mb, root_sectors * SECTOR >> 20)
    return dest
