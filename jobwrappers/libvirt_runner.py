"""Runs the VM as a transient libvirt domain started with VIR_DOMAIN_START_AUTODESTROY: libvirt
destroys it as soon as this process's connection closes, so a dead wrapper never leaves a VM.
The verified base is handed over as a descriptor (virDomainFDAssociate, `<source fdgroup=...>`),
so libvirt's QEMU reads the bytes that were checked, as the plain QEMU runner does. Every value in
the domain XML is escaped (`xml_text`, `quoteattr`)."""
from __future__ import annotations

import logging
import os
import shutil
import string
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import libvirt

from cluster.errors import SpecError, TempFailure
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
    """<os> children: the kernel for direct boot; OVMF's flash and this VM's own variable store for
    UEFI; nothing for SeaBIOS (libvirt's default). The boot device is the root disk's <boot order>."""
    if not m.kernel:
        fw = m.firmware
        if fw.kind != "uefi":
            return ""
        return (f"    <loader readonly='yes' type='pflash' secure='no'>{xml_text(fw.code)}</loader>\n"
                f"    <nvram>{xml_text(fw.vars)}</nvram>")
    lines = [f"    <kernel>{xml_text(m.kernel)}</kernel>"]
    if m.initrd:
        lines.append(f"    <initrd>{xml_text(m.initrd)}</initrd>")
    lines.append(f"    <cmdline>{xml_text(m.cmdline)}</cmdline>")
    return "\n".join(lines)


def _backing_xml(i: int, d: Disk) -> str:
    """The overlay's backing chain spelled out (its header names none): the verified base, in the
    signed entry's format, with an empty <backingStore/> so libvirt gives it no backing of its own,
    read from the descriptor associated as fdgroup `baseI` (the file name is then only a label)."""
    if d.backing is None:
        return "      <backingStore/>\n"
    return ("      <backingStore type='file'>\n"
            f"        <format type={quoteattr(d.backing.format)}/>\n"
            f"        <source file={quoteattr(str(d.backing.path))} fdgroup='base{i}'/>\n"
            "        <backingStore/>\n"
            "      </backingStore>\n")


def _disks_xml(m: Machine) -> str:
    out = []
    for i, d in enumerate(m.disks):
        dev = "vd" + chr(ord("a") + i)
        out.append("    <disk type='file' device='disk'>\n"
                   f"      <driver name='qemu' type={quoteattr(d.format)} cache='writeback'/>\n"
                   f"      <source file={quoteattr(str(d.path))}/>\n"
                   + _backing_xml(i, d)
                   + f"      <target dev='{dev}' bus='virtio'/>\n"
                   + ("      <boot order='1'/>\n" if i == 0 and not m.kernel else "")
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
        "console_socket": xml_text(m.console_socket),
        "netdev": xml_text("user,id=salvusnet" + "".join(f",hostfwd={r}" for r in m.hostfwds())),
    }
    try:
        return string.Template(text).substitute(fields)
    except (KeyError, ValueError) as e:
        raise SpecError(f"hypervisor.domain_template: {path}: unknown or malformed field {e}") from None


class LibvirtRunner(VmRunner):
    kind = "libvirt"

    def __init__(self, machine: Machine, conn: libvirt.virConnect, template: Path | None = None) -> None:
        super().__init__(machine)
        self.conn = conn
        self.template = template
        self.dom: libvirt.virDomain | None = None
        self.error = ""

    def start(self) -> None:
        """define, hand libvirt the verified bases' descriptors, start with AUTODESTROY, undefine: the
        domain is transient again while it runs and dies with this connection. libvirt 9.0's
        virDomainFDAssociate needs a domain object before start, which createXML does not give; its
        QEMU then opens each base from /dev/fdset (the `fdgroup` of `_backing_xml`), never by name."""
        xml = render_domain_xml(self.machine, self.template)
        self._drop_leftover_definition()
        try:
            dom = self.conn.defineXML(xml)
        except libvirt.libvirtError as e:
            self.error = e.get_error_message() or str(e)
            return
        try:
            for i, d in enumerate(self.machine.disks):
                if d.backing is not None:
                    dom.FDAssociate(f"base{i}", [d.backing.fd], 0)
            dom.createWithFlags(libvirt.VIR_DOMAIN_START_AUTODESTROY)
            self.dom = dom
        except libvirt.libvirtError as e:
            self.error = e.get_error_message() or str(e)
        finally:
            try:
                dom.undefine()
            except libvirt.libvirtError as e:
                log.warning("cannot undefine %s: %s", dom.name(), e.get_error_message())

    def _drop_leftover_definition(self) -> None:
        """A wrapper killed between define and undefine leaves an inactive definition of its domain
        (never a running VM: AUTODESTROY), which would block this name for good; remove it."""
        name = f"salvus-{self.machine.name}"
        try:
            old = self.conn.lookupByName(name)
            if old.isPersistent() and not old.isActive():
                log.info("removing the inactive definition %s a killed wrapper left", name)
                old.undefine()
        except libvirt.libvirtError:
            pass  # none (the usual case), or it is running: defineXML then says so

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
