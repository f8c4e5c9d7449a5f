"""Which accelerator QEMU can use here: KVM when a vCPU really runs under it, else TCG.

`/dev/kvm` existing proves little: under nested virtualization it opens fine and then fails on the
first MSR write or hangs. So the check boots a 64 KiB firmware whose reset vector writes one byte to
QEMU's isa-debug-exit port, with exactly the CPU model the guests will get, and requires QEMU to exit
with that byte within a few seconds.
"""
from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import SpecError

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
PROBE_TIMEOUT_S = 5.0
# Real mode at the reset vector 0xFFFF0: mov al, 1; out 0xf4, al; hlt. isa-debug-exit turns the
# byte into QEMU's exit status (1 << 1) | 1.
_RESET_CODE = bytes([0xB0, 0x01, 0xE6, 0xF4, 0xF4])
_EXPECTED_STATUS = 3


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    qemu_args: tuple[str, ...]
    libvirt_type: str  # <domain type=...>
    libvirt_cpu: str  # <cpu> element
    libvirt_features: str = ""  # extra children of <features>


KVM = Accel("kvm", ("-accel", "kvm", "-cpu", "host"), "kvm", "<cpu mode='host-passthrough'/>")
# A small translation cache: the default (1 GiB per VM under TCG) would cap a host at a few guests.
TCG = Accel("tcg", ("-accel", "tcg,tb-size=16", "-cpu", "max"), "qemu", "<cpu mode='maximum'/>",
            "<tcg><tb-cache unit='MiB'>16</tb-cache></tcg>")


def kvm_works(qemu: str = QEMU, timeout: float = PROBE_TIMEOUT_S) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory(prefix="salvus-kvm-") as tmp:
        firmware = Path(tmp) / "reset.bin"
        image = bytearray(64 * 1024)
        image[0xFFF0:0xFFF0 + len(_RESET_CODE)] = _RESET_CODE
        firmware.write_bytes(image)
        cmd = [qemu, *KVM.qemu_args, "-machine", "pc", "-m", "16", "-nodefaults", "-no-user-config",
               "-display", "none", "-bios", str(firmware),
               "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            log.debug("KVM probe did not finish in %.0f s", timeout)
            return False
        except OSError as e:
            raise SpecError(f"cannot run {qemu}: {e.strerror} (install qemu-system-x86: scripts/setup)") from None
    if proc.returncode != _EXPECTED_STATUS:
        log.debug("KVM probe exited %s: %s", proc.returncode, proc.stderr.decode(errors="replace").strip())
    return proc.returncode == _EXPECTED_STATUS


def choose_accel(requested: str) -> Accel:
    """`hypervisor.accel`: "kvm" and "tcg" are taken as given (kvm checked); "auto" detects."""
    if requested == "tcg":
        return TCG
    if kvm_works():
        return KVM
    if requested == "kvm":
        raise SpecError("hypervisor.accel: kvm was requested but KVM does not run a vCPU on this host "
                        "(use 'auto' or 'tcg')")
    log.warning("KVM is not usable on this host; running guests under TCG emulation (slow)")
    return TCG
