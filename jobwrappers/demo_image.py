"""Builds the demo guest image: Debian's kernel, a tiny busybox initramfs, an ext4 root as qcow2.

Real sites boot their own images (cloud images with cloud-init). The demo image exists so the whole
system runs on one machine in seconds: its init (files under `jobwrappers/guest/`) reads the NoCloud
config drive the wrapper builds, runs the role's service on the role's port and an SSH server
(dropbear) for root with the spec's keys, and reports its host key on the host channel. Nothing here needs
root or a loop mount: `mkfs.ext4 -d` fills the filesystem from a directory and `cpio` packs the
initramfs.
"""
from __future__ import annotations

import argparse
import logging
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from catalogue.qcow2 import COMPRESSION_TYPES as QCOW2_COMPRESSION
from cluster.errors import DataError, SpecError
from jobwrappers.wholedisk import BootEntry, build_whole_disk

log = logging.getLogger(__name__)

GUEST_DIR = Path(__file__).resolve().parent / "guest"
DEMO_NAME = "demo"
DEMO_VERSION = "1"
ROOT_SIZE = "64M"
# What the guest needs that Debian builds as modules. crc32c_generic is only a soft dependency of
# ext4/jbd2 (modules.softdep), so it is named explicitly and loaded first.
GUEST_MODULES = ("crc32c_generic", "virtio_pci", "virtio_blk", "virtio_net", "virtio_console",
                 "ext4", "isofs", "evdev", "button")
XZ_MAGIC = b"\xfd7zXZ\x00"
COMPRESSION_TYPES = tuple(QCOW2_COMPRESSION.values())  # the ones the header rules accept
# The demo init reads only root=DEVICE (no PARTUUID): the root is the second partition of vda.
# Not quiet: the firmware tests read the kernel's own lines (version, EFI) on the console.
WHOLE_DISK_CMDLINE = "console=ttyS0 root=/dev/vda2 rw panic=-1"


@dataclass(frozen=True)
class DemoImage:
    disk: Path  # qcow2 base image
    kernel: Path  # uncompressed vmlinux (PVH entry: no firmware, no decompression at boot)
    initrd: Path

    def paths(self) -> tuple[Path, Path, Path]:
        return self.disk, self.kernel, self.initrd

    def exists(self) -> bool:
        return all(p.is_file() for p in self.paths())


def demo_image_paths(out_dir: Path, name: str = DEMO_NAME, version: str = DEMO_VERSION) -> DemoImage:
    stem = out_dir / f"{name}-{version}"
    return DemoImage(disk=stem.with_suffix(".qcow2"), kernel=stem.with_suffix(".vmlinux"),
                     initrd=stem.with_suffix(".initrd"))


def find_kernel(boot: Path = Path("/boot"), modules: Path = Path("/usr/lib/modules")) -> tuple[Path, Path]:
    """The newest installed kernel that has its modules: (vmlinuz, modules dir)."""
    found = []
    for vmlinuz in boot.glob("vmlinuz-*"):
        version = vmlinuz.name[len("vmlinuz-"):]
        if (modules / version / "modules.dep").is_file():
            found.append((tuple(int(x) for x in re.findall(r"\d+", version)), vmlinuz, modules / version))
    if not found:
        raise SpecError(f"no kernel with modules under {boot} and {modules} "
                        "(install linux-image-amd64: scripts/setup)")
    _, vmlinuz, moddir = max(found)
    return vmlinuz, moddir


def module_load_order(moddir: Path, wanted: tuple[str, ...] = GUEST_MODULES) -> list[Path]:
    """Module files relative to `moddir`, each after its dependencies (modules.dep order)."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        if name not in by_name:
            raise SpecError(f"{moddir}: kernel module {name} not found (is it built in?)")
        visit(by_name[name])
    return [Path(p) for p in order]


def extract_vmlinux(bzimage: Path, dest: Path) -> None:
    """The uncompressed kernel ELF inside a bzImage. Booting it directly uses the PVH entry point,
    which skips firmware and in-guest decompression (about half the boot time under TCG). The Linux
    tree's scripts/extract-vmlinux does the same search; it is not shipped in a Debian package."""
    data = bzimage.read_bytes()
    start = data.find(XZ_MAGIC)
    while start != -1:
        try:
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(b"\x7fELF"):
            dest.write_bytes(elf)
            return
        start = data.find(XZ_MAGIC, start + 1)
    raise DataError(f"{bzimage}: no xz-compressed ELF kernel inside (expected a CONFIG_KERNEL_XZ bzImage)")


def _run(*cmd: str | Path, cwd: Path | None = None, stdin: bytes | None = None) -> bytes:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, input=stdin, capture_output=True)
    if proc.returncode != 0:
        raise SpecError(f"{Path(str(cmd[0])).name} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def _busybox() -> Path:
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        if Path(cand).is_file():
            return Path(cand)
    raise SpecError("busybox not found (install busybox-static: scripts/setup)")


# The demo guest's SSH server (Debian's dropbear-bin) and its key tool, copied with the shared
# libraries they link (dropbear is a few hundred KiB; libc is most of the ~3 MiB they add).
SSH_BINARIES = (Path("/usr/sbin/dropbear"), Path("/usr/bin/dropbearkey"))


def _shared_libraries(binary: Path) -> list[Path]:
    """What `ldd` says `binary` loads (its libraries and the dynamic loader), absolute paths."""
    libs = []
    for line in _run("ldd", binary).decode().splitlines():
        words = line.split()
        path = words[2] if len(words) >= 3 and words[1] == "=>" else words[0] if words else ""
        if path.startswith("/"):
            libs.append(Path(path))
    return libs


def _install_ssh_server(root: Path) -> None:
    missing = [str(b) for b in SSH_BINARIES if not b.is_file()]
    if missing:
        raise SpecError(f"{', '.join(missing)} not found (install dropbear-bin: scripts/setup)")
    for binary in SSH_BINARIES:
        for f in (binary, *_shared_libraries(binary)):
            dest = root / f.relative_to("/")
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dest)  # follows symlinks: the guest gets the files themselves


def _write_initramfs(work: Path, moddir: Path, dest: Path) -> None:
    tree = work / "initramfs"
    (tree / "bin").mkdir(parents=True)
    (tree / "modules").mkdir()
    shutil.copy2(_busybox(), tree / "bin" / "busybox")
    shutil.copy2(GUEST_DIR / "init", tree / "init")
    names = []
    for rel in module_load_order(moddir):
        shutil.copy2(moddir / rel, tree / "modules" / rel.name)
        names.append(rel.name)
    (tree / "modules.order").write_text("\n".join(names) + "\n")
    files = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    # Uncompressed: the kernel would spend longer inflating it under TCG than it saves in reading.
    dest.write_bytes(_run("cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0", cwd=tree,
                          stdin=("\n".join(files) + "\n").encode()))


def _populate_root(root: Path) -> None:
    for d in ("bin", "sbin", "etc/salvus/roles", "etc/acpi/PWRF", "proc", "sys", "dev", "run", "tmp",
              "root", "data", "var/log"):
        (root / d).mkdir(parents=True, exist_ok=True)
    busybox = _busybox()
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in _run(busybox, "--list").decode().split():
        if applet != "busybox" and not (root / "bin" / applet).exists():
            (root / "bin" / applet).symlink_to("busybox")
    (root / "sbin" / "init").symlink_to("/bin/busybox")
    shutil.copy2(GUEST_DIR / "inittab", root / "etc" / "inittab")
    for script in ("rc.boot", "poweroff", "service", "channel", "sshd", "reach"):
        shutil.copy2(GUEST_DIR / script, root / "etc" / "salvus" / script)
    for script in (GUEST_DIR / "roles").iterdir():
        shutil.copy2(script, root / "etc" / "salvus" / "roles" / script.name)
    # busybox acpid runs CONFDIR/PWRF/00000080 when the ACPI power button is pressed.
    (root / "etc" / "acpi" / "PWRF" / "00000080").symlink_to("/etc/salvus/poweroff")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\ntty:x:5:\n")
    (root / "etc" / "shells").write_text("/bin/sh\n")
    _install_ssh_server(root)


def build_demo_image(out_dir: Path, name: str = DEMO_NAME, version: str = DEMO_VERSION,
                     compression: str | None = None) -> DemoImage:
    """Builds (or rebuilds) the demo image into `out_dir`; each file appears atomically, read-only.
    With `compression` (zlib or zstd) the qcow2's clusters are compressed: about half the bytes to
    distribute, booted as they are (QEMU inflates a cluster when the guest reads it)."""
    if compression is not None and compression not in COMPRESSION_TYPES:
        raise SpecError(f"compression {compression!r}; expected one of {', '.join(COMPRESSION_TYPES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = demo_image_paths(out_dir, name, version)
    vmlinuz, moddir = find_kernel()
    log.info("building demo image %s@%s from kernel %s", name, version, vmlinuz.name)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out_dir) as tmp:
        work = Path(tmp)
        built = demo_image_paths(work, name, version)
        _write_initramfs(work, moddir, built.initrd)
        root = work / "rootfs"
        _populate_root(root)
        raw = work / "root.ext4"
        _run("mkfs.ext4", "-q", "-F", "-L", "vmroot", "-E", "root_owner=0:0", "-d", root, raw, ROOT_SIZE)
        packed = ("-c", "-o", f"compression_type={compression}") if compression else ()
        _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", *packed, raw, built.disk)
        extract_vmlinux(vmlinuz, built.kernel)
        for src, dst in zip(built.paths(), target.paths()):
            src.chmod(0o444)
            os.replace(src, dst)
    return target


def build_demo_whole_disk(image: DemoImage, dest: Path) -> Path:
    """The demo guest as a whole disk booted by firmware (jobwrappers/wholedisk.py): the demo root as
    partition 2, and on the ESP this machine's Debian kernel as a bzImage (bootloaders start a
    bzImage, not the bare vmlinux direct boot uses) with the demo initramfs built for it."""
    vmlinuz, _ = find_kernel()
    with tempfile.TemporaryDirectory(prefix=".build-", dir=dest.parent) as tmp:
        work = Path(tmp)
        root = work / "root.ext4"
        _run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", image.disk, root)
        raw = build_whole_disk(root, BootEntry(vmlinuz, image.initrd, WHOLE_DISK_CMDLINE), work / "disk.raw")
        built = work / dest.name
        _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, built)
        built.chmod(0o444)
        os.replace(built, dest)
    return dest


def kernel_release(vmlinuz: Path) -> str:
    """`uname -r` of a Debian kernel file, from its name (vmlinuz-RELEASE)."""
    return vmlinuz.name.removeprefix("vmlinuz-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    image = build_demo_image(args.out)
    print("\n".join(str(p) for p in image.paths()))
    return 0
