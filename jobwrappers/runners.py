"""Picks how the VM runs: libvirt when a daemon is reachable (or named), else a plain QEMU child."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from cluster.errors import SpecError, TempFailure
from cluster.spec import ClusterSpec
from jobwrappers.machine import Machine, VmRunner
from jobwrappers.qemu_runner import QemuRunner

log = logging.getLogger(__name__)

SYSTEM_SOCKET = Path("/run/libvirt/libvirt-sock")


def libvirt_uri(spec: ClusterSpec) -> str | None:
    """The URI to use, or None for plain QEMU. "auto" means the system daemon if its socket is there:
    connecting to a daemon that is not running would cost a timeout on every job start."""
    setting = spec.hypervisor.libvirt
    if setting == "never":
        return None
    if setting == "auto":
        return "qemu:///system" if os.geteuid() == 0 and SYSTEM_SOCKET.exists() else None
    return setting


def open_runner(spec: ClusterSpec, machine: Machine) -> VmRunner:
    uri = libvirt_uri(spec)
    if uri is None:
        return QemuRunner(machine)
    if machine.net is not None:
        # The helper binds a VM's rules to the tap its QEMU holds; libvirt's QEMU is not ours to ask.
        log.info("network: site runs under plain QEMU, not libvirt")
        return QemuRunner(machine)
    from cluster.extras import require

    try:
        require("libvirt", "libvirt", f"hypervisor.libvirt: {spec.hypervisor.libvirt}")
    except SpecError:
        if spec.hypervisor.libvirt != "auto":
            raise
        log.info("libvirt-python is not installed; using plain QEMU")
        return QemuRunner(machine)
    from jobwrappers.libvirt_runner import LibvirtRunner, connect  # libvirt only when used

    try:
        conn = connect(uri)
    except TempFailure:
        if spec.hypervisor.libvirt != "auto":
            raise
        log.info("libvirt at %s not answering; using plain QEMU", uri)
        return QemuRunner(machine)
    template = Path(spec.hypervisor.domain_template) if spec.hypervisor.domain_template else None
    if template is not None and not template.is_file():
        raise SpecError(f"hypervisor.domain_template: {template} does not exist")
    return LibvirtRunner(machine, conn, template)
