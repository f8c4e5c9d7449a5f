"""Runs the VM as a transient libvirt domain created with VIR_DOMAIN_START_AUTODESTROY: libvirt
destroys it as soon as this process's connection closes, so a dead wrapper never leaves a VM."""
from __future__ import annotations

import logging
import os
import shutil
import string
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import libvirt

from cluster.errors import DataError, SpecError, TempFailure
from jobwrappers.machine import CHANNEL_NAME, Disk, Machine, VmRunner

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = Path(__file__).resolve().parent / "domain.xml.tmpl"


def _ignore_libvirt_errors(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; ours are raised and reported once."""


def connect(uri: str) -> libvirt.virConnect:
    libvirt.registerErrorHandler(_ignore_libvirt_errors, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise TempFailure(f"libvirt {uri}: {e.get_error_message()}") from None


def xml_text(value: object) -> str:
    """A value for element text or a quoted attribute of the template (both quote characters too:
    the template's attributes use single quotes)."""
    return escape(str(value), {"'": "&apos;", '"': "&quot;"})


def _boot_xml(m: Machine) -> str:
    if not m.kernel:
        return "    <boot dev='hd'/>"
    lines = [f"    <kernel>{xml_text(m.kernel)}</kernel>"]
    if m.initrd:
        lines.append(f"    <initrd>{xml_text(m.initrd)}</initrd>")
    lines.append(f"    <cmdline>{xml_text(m.cmdline)}</cmdline>")
    return "\n".join(lines)


def _backing_xml(d: Disk) -> str:
    """The overlay's backing chain spelled out (its header names none): the verified base, in the
    signed entry's format, with an empty <backingStore/> so libvirt gives it no backing of its own."""
    if d.backing is None:
        return "      <backingStore/>\n"
    return ("      <backingStore type='file'>\n"
            f"        <format type={quoteattr(d.backing.format)}/>\n"
            f"        <source file={quoteattr(str(d.backing.path))}/>\n"
            "        <backingStore/>\n"
            "      </backingStore>\n")


def _disks_xml(m: Machine) -> str:
    out = []
    for i, d in enumerate(m.disks):
        dev = "vd" + chr(ord("a") + i)
        out.append("    <disk type='file' device='disk'>\n"
                   f"      <driver name='qemu' type={quoteattr(d.format)} cache='writeback'/>\n"
                   f"      <source file={quoteattr(str(d.path))}/>\n"
                   + _backing_xml(d)
                   + f"      <target dev='{dev}' bus='virtio'/>\n"
                   + (f"      <serial>{xml_text(d.serial)}</serial>\n" if d.serial else "")
                   + ("      <readonly/>\n" if d.readonly else "")
                   + "    </disk>")
    return "\n".join(out)


def render_domain_xml(m: Machine, template: Path | None = None) -> str:
    path = template or DEFAULT_TEMPLATE
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"hypervisor.domain_template: cannot read {path}: {e.strerror}") from None
    fields = {
        "domain_type": xml_text(m.accel.libvirt_type), "name": xml_text(f"salvus-{m.name}"),
        "memory_mb": str(m.memory_mb), "vcpus": str(m.vcpus), "boot": _boot_xml(m), "cpu": m.accel.libvirt_cpu,
        "accel_features": m.accel.libvirt_features,
        "emulator": xml_text(shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"),
        "disks": _disks_xml(m), "console_log": xml_text(m.console_log),
        "channel_path": xml_text(m.channel_path), "channel_name": xml_text(CHANNEL_NAME),
        "uid": str(os.getuid()), "gid": str(os.getgid()),
        "netdev": xml_text(f"user,id=salvusnet,hostfwd=tcp:{m.host_addr}:{m.host_port}-:{m.guest_port}"),
    }
    try:
        return string.Template(text).substitute(fields)
    except (KeyError, ValueError) as e:
        raise SpecError(f"hypervisor.domain_template: {path}: unknown or malformed field {e}") from None


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class LibvirtRunner(VmRunner):
    kind = "libvirt"

    def __init__(self, machine: Machine, conn: libvirt.virConnect, template: Path | None = None) -> None:
        super().__init__(machine)
        self.conn = conn
        self.template = template
        self.dom: libvirt.virDomain | None = None
        self.error = ""

    def start(self) -> None:
        xml = render_domain_xml(self.machine, self.template)
        try:
            self.dom = self.conn.createXML(xml, libvirt.VIR_DOMAIN_START_AUTODESTROY)
        except libvirt.libvirtError as e:
            self.error = e.get_error_message() or str(e)
            return
        self._recheck_bases()

    def _recheck_bases(self) -> None:
        """libvirt's QEMU opens the base by name, not from our descriptor. Passing it (libvirt 9.0's
        virDomainFDAssociate with <source fdgroup=...>) needs a defined domain, not the transient
        AUTODESTROY one this runner relies on, so instead: after start the name must still be the
        inode that was checked and hashed, with the same stamps. StrictModes (catalogue.imagefile)
        means only root or the store's owner could have changed that inode in place."""
        for d in self.machine.disks:
            if d.backing is None:
                continue
            try:
                same = _stamp(os.stat(d.backing.path)) == _stamp(os.fstat(d.backing.fd))
            except OSError:
                same = False
            if not same:
                self.destroy()
                self.dom = None
                raise DataError(f"{d.backing.path}: replaced or changed while libvirt started the VM; refused")

    def alive(self) -> bool:
        if self.dom is None:
            return False
        try:
            return bool(self.dom.isActive())
        except libvirt.libvirtError:
            return False

    @property
    def pid(self) -> int | None:
        try:
            return int(Path(f"/run/libvirt/qemu/salvus-{self.machine.name}.pid").read_text())
        except (OSError, ValueError):
            return None

    def failure_detail(self) -> str:
        return self.error

    def request_shutdown(self) -> None:
        if self.dom is not None:
            self.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)

    def destroy(self) -> None:
        if self.dom is None:
            return
        try:
            self.dom.destroy()
        except libvirt.libvirtError:
            pass  # already gone (transient domains vanish when they stop)

    def close(self) -> None:
        self.destroy()
        try:
            self.conn.close()
        except libvirt.libvirtError:
            pass
