"""Builds a real Debian 12 cloud image from Debian's packages: systemd, cloud-init, openssh-server,
the image's own kernel, and a small `sage` service on port 6000 — what a site's own image is like,
made here because no cloud image can be downloaded.

    python -m jobwrappers.debian_image [--cache DIR]      # prints the three paths

`debootstrap` fills a directory, `mkfs.ext4 -d` turns it into a filesystem without a loop device or
mount, and `qemu-img convert -c` makes the compressed qcow2; the same filesystem is also laid out
as a whole disk with its own bootloaders (jobwrappers/wholedisk.py) for firmware boot. The result is cached under
`/var/cache/salvus/images/debian12-KEY/`, KEY being the hash of the recipe below, so a changed
recipe builds a new image and an unchanged one is built once per machine. No SSH host keys are
baked in (cloud-init makes each VM its own). The kernel and initrd are copied out beside the disk
for direct kernel boot (`boot: {kernel, initrd}`; root is `/dev/vda`); the whole disk boots them
from its ESP (root is partition 2, found by PARTUUID).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import SpecError, TempFailure
from cluster.files import locked
from jobwrappers.wholedisk import BootEntry, build_whole_disk

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("/var/cache/salvus/images")
SUITE = "bookworm"
# debootstrap resolves no virtual packages: python3-cffi-backend is named for python3-cryptography
# (cloud-init); dbus for hostnamectl; ifupdown + isc-dhcp-client because cloud-init renders ENI.
PACKAGES = ("systemd-sysv", "udev", "kmod", "dbus", "cloud-init", "python3-cffi-backend", "openssh-server",
            "ifupdown", "isc-dhcp-client", "netbase", "iproute2", "sudo", "socat", "linux-image-amd64")
ROOT_SIZE = "2G"
SAGE_PORT = 6000
CMDLINE = "console=ttyS0 root=/dev/vda rw rootfstype=ext4 panic=-1"
# The whole disk (firmware boot) finds its root as a site's image does, by partition UUID, whatever
# the disk's name; every VM of the image shares it, as with any cloud image.
ROOT_PARTUUID = "5a1705e5-0000-4000-8000-000000000002"
WHOLE_DISK_CMDLINE = f"console=ttyS0 root=PARTUUID={ROOT_PARTUUID} rw rootfstype=ext4 panic=-1"

# The image's role service: one integer expression per line, like the demo guest's sage. Only
# digits, operators, parentheses and spaces reach the shell's arithmetic.
SAGE_SERVICE = r"""#!/bin/sh
CR=$(printf '\r')
while IFS= read -r line; do
  line=${line%"$CR"}
  case "$line" in
    *[!0-9+*/%\(\)\ -]*|'') echo "error: integer expressions only" ;;
    *) echo "$(( $line ))" 2>/dev/null || echo "error" ;;
  esac
done
"""
SAGE_UNIT = f"""[Unit]
Description=salvus test role service (integer expressions on port {SAGE_PORT})
After=network.target

[Service]
ExecStart=/usr/bin/socat TCP-LISTEN:{SAGE_PORT},reuseaddr,fork EXEC:/usr/local/bin/salvus-sage
Restart=always

[Install]
WantedBy=multi-user.target
"""
# sshd makes its own host keys when nothing else did (an image booted with cloud-init=disabled,
# as the readiness: probe test does); with cloud-init, its ssh module makes them first.
SSH_KEYS_DROPIN = """[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
"""
# With cloud-init disabled (the readiness: probe test) nothing would configure the NIC: a site's
# image without cloud-init has its own network configuration, this one asks DHCP once.
FALLBACK_NET_UNIT = """[Unit]
Description=salvus test image: DHCP on the first NIC when cloud-init is disabled
ConditionKernelCommandLine=cloud-init=disabled
Wants=network.target
Before=network.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'for i in /sys/class/net/en*; do exec /sbin/dhclient -1 "$${i##*/}"; done'

[Install]
WantedBy=multi-user.target
"""
# The image has no `locales` package; cloud-init's locale module would fail on en_US.UTF-8.
CLOUD_CFG = "locale: false\n"
FILES = {"usr/local/bin/salvus-sage": (SAGE_SERVICE, 0o755),
         "etc/systemd/system/salvus-sage.service": (SAGE_UNIT, 0o644),
         "etc/systemd/system/ssh.service.d/host-keys.conf": (SSH_KEYS_DROPIN, 0o644),
         "etc/cloud/cloud.cfg.d/90-salvus-test.cfg": (CLOUD_CFG, 0o644),
         "etc/systemd/system/salvus-fallback-net.service": (FALLBACK_NET_UNIT, 0o644)}
UNITS = ("salvus-sage.service", "salvus-fallback-net.service")  # enabled in multi-user.target
BUILDER_VERSION = 2  # bump when the build steps below change what ends up in the image


@dataclass(frozen=True)
class DebianImage:
    disk: Path  # compressed qcow2, ext4 root filesystem (no partition table): direct kernel boot
    kernel: Path
    initrd: Path
    # The same root filesystem, kernel and initrd as a whole disk (GPT, ESP with syslinux and
    # systemd-boot; jobwrappers/wholedisk.py), compressed qcow2: booted by BIOS or UEFI firmware.
    whole_disk: Path
    release_file: Path  # the kernel's `uname -r`
    cmdline: str = CMDLINE

    def exists(self) -> bool:
        return all(p.is_file() for p in (self.disk, self.kernel, self.initrd, self.whole_disk, self.release_file))

    @property
    def kernel_release(self) -> str:
        return self.release_file.read_text().strip()


def recipe_key() -> str:
    recipe = {"suite": SUITE, "packages": PACKAGES, "files": FILES, "size": ROOT_SIZE, "builder": BUILDER_VERSION,
              "whole_disk_cmdline": WHOLE_DISK_CMDLINE}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=list).encode()).hexdigest()[:16]


def image_paths(cache: Path = DEFAULT_CACHE) -> DebianImage:
    d = cache / f"debian12-{recipe_key()}"
    return DebianImage(d / "debian12.qcow2", d / "vmlinuz", d / "initrd.img", d / "debian12-disk.qcow2",
                       d / "kernel.release")


def host_mirror(sources: Path = Path("/etc/apt/sources.list.d/debian.sources")) -> str:
    """The Debian mirror this host's apt uses (so the build works wherever apt does)."""
    try:
        for line in sources.read_text().splitlines():
            m = re.fullmatch(r"URIs:\s*(\S+)", line.strip())
            if m and not m.group(1).rstrip("/").endswith("-security"):
                return m.group(1)
    except OSError:
        pass
    return "http://deb.debian.org/debian"


def _run(argv: list[str], what: str) -> None:
    log.info("%s: %s", what, " ".join(argv[:4]))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        raise SpecError(f"{what}: {argv[0]} not installed (run scripts/setup)") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise TempFailure(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")


def _fill_rootfs(root: Path, debs: Path) -> None:
    _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", f"--cache-dir={debs}",
          SUITE, str(root), host_mirror()], "debootstrap")
    for rel, (text, mode) in FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for unit in UNITS:
        link = wants / unit
        if not link.is_symlink():
            link.symlink_to(f"/etc/systemd/system/{unit}")
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # every VM makes its own (cloud-init's ssh module)
    (root / "etc/machine-id").write_text("")  # systemd makes one per boot of an empty file
    # By label: the same filesystem is /dev/vda (direct boot) and /dev/vda2 (the whole disk).
    (root / "etc/fstab").write_text("LABEL=root / ext4 rw,errors=remount-ro 0 1\n")
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True)


def prune_other_recipes(cache: Path, keep: Path) -> None:
    """Removes the images of other recipes (~700 MiB each): a new recipe replaces the old one, and
    nothing else reads the cache. Runs under the build lock, only after a build succeeded."""
    for old in cache.glob("debian12-*"):
        if old != keep and old.is_dir() and re.fullmatch(r"debian12-[0-9a-f]{16}", old.name):
            log.info("removing %s (an earlier recipe)", old)
            shutil.rmtree(old, ignore_errors=True)


def build(cache: Path = DEFAULT_CACHE) -> DebianImage:
    """The cached image for this recipe, built first when missing (~2-4 min here)."""
    img = image_paths(cache)
    if img.exists():
        return img
    img.disk.parent.mkdir(parents=True, exist_ok=True)
    with locked(cache / ".build.lock"):
        if img.exists():  # built by another process while we waited
            return img
        with tempfile.TemporaryDirectory(prefix="debian12-", dir=cache) as tmp:
            work = Path(tmp)
            root = work / "root"
            debs = cache / "debs"
            debs.mkdir(exist_ok=True)
            _fill_rootfs(root, debs)
            kernels = sorted((root / "boot").glob("vmlinuz-*"))
            initrds = sorted((root / "boot").glob("initrd.img-*"))
            if not kernels or not initrds:
                raise TempFailure(f"{root}/boot: no kernel or initrd after debootstrap")
            raw = work / "root.ext4"
            _run(["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(root), str(raw), ROOT_SIZE], "mkfs.ext4")
            disk = work / "debian12.qcow2"
            _run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(disk)], "qemu-img convert")
            shutil.copyfile(kernels[-1], work / "vmlinuz")
            shutil.copyfile(initrds[-1], work / "initrd.img")
            (work / "kernel.release").write_text(kernels[-1].name.removeprefix("vmlinuz-") + "\n")
            whole = build_whole_disk(raw, BootEntry(work / "vmlinuz", work / "initrd.img", WHOLE_DISK_CMDLINE),
                                     work / "disk.raw", root_partuuid=ROOT_PARTUUID)
            _run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(whole),
                  str(work / "debian12-disk.qcow2")], "qemu-img convert")
            whole.unlink()
            # The direct-boot disk last: exists() then sees every file.
            for f in ("vmlinuz", "initrd.img", "kernel.release", "debian12-disk.qcow2", "debian12.qcow2"):
                os.chmod(work / f, 0o444)
                os.replace(work / f, img.disk.parent / f)
        prune_other_recipes(cache, keep=img.disk.parent)
    log.info("built %s (%d MiB)", img.disk, img.disk.stat().st_size >> 20)
    return img


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobwrappers.debian_image",
                                description="Build (or find) the cached Debian 12 cloud-init test image.")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"cache directory (default {DEFAULT_CACHE})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    img = build(args.cache)
    print(f"disk={img.disk}\nkernel={img.kernel}\ninitrd={img.initrd}\ncmdline={img.cmdline}\n"
          f"whole_disk={img.whole_disk}\nkernel_release={img.kernel_release}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
