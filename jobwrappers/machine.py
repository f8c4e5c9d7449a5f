"""What one VM is, independent of how it is run (plain QEMU or libvirt), and the runner interface."""
from __future__ import annotations

import abc
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from catalogue.imagefile import OpenImage
from jobwrappers.accel import Accel
from jobwrappers.firmware import DIRECT, Firmware

log = logging.getLogger(__name__)

CHANNEL_NAME = "org.salvus.channel.0"


@dataclass(frozen=True)
class Disk:
    path: Path
    format: str  # qcow2 | raw
    serial: str = ""  # the guest finds persistent disks by this (/sys/block/vdX/serial)
    readonly: bool = False
    # The verified base under a header-less overlay: the runner opens it read-only, with the entry's
    # format and no backing of its own; the plain QEMU runner hands QEMU this very descriptor.
    backing: Optional[OpenImage] = None


@dataclass(frozen=True)
class SiteNic:
    """network: site: a tap on `bridge` (made by qemu-bridge-helper) with the VM's leased MAC."""

    bridge: str
    mac: str
    mtu: int
    helper: str = "/usr/lib/qemu/qemu-bridge-helper"


@dataclass
class Machine:
    name: str
    vcpus: int
    memory_mb: int
    accel: Accel
    disks: list[Disk]  # the root overlay first: it becomes /dev/vda
    guest_port: int
    host_addr: str  # where the forwarded port listens on this host
    host_port: int
    channel_path: Path  # unix socket of the virtio-serial host channel
    console_log: Path
    workdir: Path
    kernel: Optional[Path] = None  # private copies of the verified bytes (QEMU reads -kernel by name)
    initrd: Optional[Path] = None
    cmdline: str = ""
    # Without a kernel: what starts the root disk's own bootloader (the root disk is the boot device).
    firmware: Firmware = DIRECT
    net: Optional[SiteNic] = None  # None: user-mode networking with the host port forward
    # A second forward to the guest's sshd (port 22) when the role's own port is another one.
    ssh_host_port: Optional[int] = None

    @property
    def console_socket(self) -> Path:
        """The serial console's unix socket (`salvus_jobs console` attaches to it), beside the channel's."""
        return self.channel_path.with_name("console.sock")

    def hostfwds(self) -> list[str]:
        """QEMU user-mode `hostfwd` rules: the role's port, and sshd's when it is another."""
        rules = [f"tcp:{self.host_addr}:{self.host_port}-:{self.guest_port}"]
        if self.ssh_host_port is not None:
            rules.append(f"tcp:{self.host_addr}:{self.ssh_host_port}-:22")
        return rules


class VmRunner(abc.ABC):
    """Starts, watches and stops one VM. A runner never outlives the wrapper's process."""

    kind: str

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def alive(self) -> bool: ...

    @abc.abstractmethod
    def request_shutdown(self) -> None:
        """ACPI power button: the guest's own orderly shutdown."""

    @abc.abstractmethod
    def destroy(self) -> None:
        """Pull the plug; a no-op when the VM is already gone."""

    def close(self) -> None:
        pass

    def failure_detail(self) -> str:
        """What the hypervisor said when the VM failed to start or died (for the job's log)."""
        return ""

    def shutdown(self, timeout: float) -> bool:
        """ACPI shutdown bounded by `timeout`, then destroy. True when the guest stopped by itself."""
        if not self.alive():
            return True
        try:
            self.request_shutdown()
        except Exception as e:  # a monitor already gone means the VM is going too
            log.warning("ACPI shutdown request failed: %s", e)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return True
            time.sleep(0.1)
        self.destroy()
        return False


def free_port(addr: str = "127.0.0.1") -> int:
    """A port nobody listens on right now; QEMU binds it a moment later (a lost race makes QEMU fail
    at start, which the wrapper retries with another port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]
