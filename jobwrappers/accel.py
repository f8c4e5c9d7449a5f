"""Which accelerator QEMU can use here: KVM when a vCPU really runs under it, else TCG.

`/dev/kvm` existing proves little: under nested virtualization it opens fine and then fails on the
first MSR write or hangs. So the check boots a 64 KiB firmware whose reset vector writes one byte to
QEMU's isa-debug-exit port, with exactly the CPU model the guests will get, and requires QEMU to exit
with that byte within a few seconds.

One KVM passes that check and still cannot run our guests: kvm-pvm, which gives a VM without
hardware virtualization a /dev/kvm. It runs only guest kernels built for it; a stock kernel boots
to nothing (seen here: no console line in 150 s, and "kvm-pvm: INTERNAL_ERROR in batch emul" in the
host's kernel log for every try). It is recognised by its module.
"""
from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from cluster.errors import SpecError
from cluster.spec import TcgSpec

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


def tcg(cpu: str = "max", tb_size_mb: int = 64) -> Accel:
    """TCG with `hypervisor.tcg`'s CPU model and translation cache (validated by the spec)."""
    libvirt_cpu = ("<cpu mode='maximum'/>" if cpu == "max" else
                   f"<cpu mode='custom' match='exact'><model fallback='forbid'>{escape(cpu)}</model></cpu>")
    return Accel("tcg", ("-accel", f"tcg,tb-size={tb_size_mb}", "-cpu", cpu), "qemu", libvirt_cpu,
                 f"<tcg><tb-cache unit='MiB'>{tb_size_mb}</tb-cache></tcg>")


TCG = tcg()


def pvm_only(sys_module: Path = Path("/sys/module")) -> bool:
    """True when KVM here is kvm-pvm (its module loaded, no hardware one beside it)."""
    return (sys_module / "kvm_pvm").is_dir() and not any(
        (sys_module / m).is_dir() for m in ("kvm_intel", "kvm_amd"))


def kvm_problem(qemu: str = QEMU, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why guests can't run under KVM here, or None when a vCPU really runs under it."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is missing or not readable and writable"
    if pvm_only():
        return "its KVM is kvm-pvm, which runs only guest kernels built for PVM"
    if not _probe_runs(qemu, timeout):
        return "a test vCPU did not run under it"
    return None


def _probe_runs(qemu: str, timeout: float) -> bool:
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


def choose_accel(requested: str, settings: TcgSpec | None = None) -> Accel:
    """`hypervisor.accel`: "kvm" and "tcg" are taken as given (kvm checked); "auto" detects.
    Under TCG, `settings` (hypervisor.tcg) choose the CPU model and translation cache."""
    settings = settings or TcgSpec()
    emulated = tcg(settings.cpu, settings.tb_size_mb)
    if requested == "tcg":
        return emulated
    problem = kvm_problem()
    if problem is None:
        return KVM
    if requested == "kvm":
        raise SpecError(f"hypervisor.accel: kvm was requested but this host can't run guests under KVM: "
                        f"{problem} (use 'auto' or 'tcg')")
    log.warning("KVM is not usable on this host (%s); running guests under TCG emulation (slow)", problem)
    return emulated
