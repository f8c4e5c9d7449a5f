"""How a VM's first code is chosen: direct kernel boot (`boot:`), or the image's own bootloader
started by firmware — SeaBIOS (QEMU's default) or UEFI from OVMF.

OVMF keeps its variables (boot entries, settings) in a second flash whose template Debian ships;
each VM gets its own copy in the job's work dir, so it goes with the job's scratch. libvirt's default
(/var/lib/libvirt/qemu/nvram/NAME_VARS.fd) would outlive the job and be shared by every VM of the
same name.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cluster.errors import SpecError
from cluster.files import PRIVATE_MODE
from cluster.spec import ClusterSpec, RoleSpec


@dataclass(frozen=True)
class Firmware:
    kind: str  # "direct" (no firmware: -kernel), "bios" or "uefi"
    code: Optional[Path] = None  # uefi: OVMF's code flash, shared read-only
    vars: Optional[Path] = None  # uefi: this VM's own copy of the variable store (read-write)


DIRECT = Firmware("direct")


def prepare_firmware(spec: ClusterSpec, role_name: str, workdir: Path) -> Firmware:
    """The role's firmware; for UEFI, its variable store copied into `workdir` (mode 0600)."""
    role: RoleSpec = spec.roles[role_name]
    if role.boot is not None:
        return DIRECT
    if role.firmware == "bios":
        return Firmware("bios")
    ovmf = spec.hypervisor.ovmf
    code, template = Path(ovmf.code), Path(ovmf.vars)
    for field, path in (("code", code), ("vars", template)):
        if not path.is_file():
            raise SpecError(f"hypervisor.ovmf.{field}: {path} is not a file (roles.{role_name}.firmware "
                            "is uefi; install Debian's ovmf: scripts/setup)")
    nvram = workdir / "OVMF_VARS.fd"
    fd = os.open(nvram, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    with open(fd, "wb") as out, open(template, "rb") as src:
        shutil.copyfileobj(src, out)
    return Firmware("uefi", code=code, vars=nvram)
