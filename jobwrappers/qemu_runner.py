"""Runs the VM as a plain `qemu-system-x86_64` child of the wrapper.

The child gets PR_SET_PDEATHSIG=SIGKILL so it dies with the wrapper even when the wrapper is
SIGKILLed (the scheduler's last resort), and its own session so a terminal's Ctrl-C or a process
group signal reaches only the wrapper, which then shuts the guest down properly.
The verified base reaches QEMU as an inherited descriptor (`-add-fd`, `/dev/fdset/N`), never by
name; disks are `-blockdev` JSON and every other path in an option string has its commas doubled.
"""
from __future__ import annotations

import ctypes
import json
import logging
import signal
import subprocess
from pathlib import Path

from jobwrappers.machine import CHANNEL_NAME, Disk, Machine, VmRunner
from jobwrappers.qmp import Qmp, QmpError

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: only async-signal-safe work (one syscall).
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def opt(value: object) -> str:
    """A value inside a QEMU `key=value,...` option string: a ',' is doubled, so a path with a comma
    stays one value instead of adding options."""
    return str(value).replace(",", ",,")


def _blockdevs(i: int, d: Disk, bootindex: int | None = None) -> tuple[list[str], list[int]]:
    """-blockdev JSON (no option-string parsing at all) for disk i, and the descriptors QEMU needs.
    A disk with a verified `backing` gets it as its backing node, opened from /dev/fdset/N (the
    descriptor that was checked and hashed), read-only, in the signed entry's format, and with no
    backing of its own; nothing is probed."""
    argv: list[str] = []
    fds: list[int] = []
    node: dict = {"driver": d.format, "node-name": f"disk{i}", "read-only": d.readonly,
                  "file": {"driver": "file", "filename": str(d.path), "read-only": d.readonly}}
    if d.backing is not None:
        fdset = i + 1
        base: dict = {"driver": d.backing.format, "node-name": f"base{i}", "read-only": True,
                      "file": {"driver": "file", "filename": f"/dev/fdset/{fdset}", "read-only": True}}
        if d.backing.format == "qcow2":
            base["backing"] = None
        argv += ["-add-fd", f"fd={d.backing.fd},set={fdset},opaque=base{i}", "-blockdev", json.dumps(base)]
        fds.append(d.backing.fd)
        node["backing"] = f"base{i}"
    elif d.format == "qcow2":
        node["backing"] = None  # persistent disks are ours and have none; never follow one
    argv += ["-blockdev", json.dumps(node)]
    dev = (f"virtio-blk-pci,drive=disk{i}" + (f",serial={opt(d.serial)}" if d.serial else "")
           + (f",bootindex={bootindex}" if bootindex is not None else ""))
    return argv + ["-device", dev], fds


def _firmware_args(m: Machine) -> tuple[str, list[str]]:
    """The -machine value and the pflash block nodes for UEFI (JSON, like the disks); nothing for
    SeaBIOS, which QEMU loads by default."""
    fw = m.firmware
    if fw.kind != "uefi":
        return "pc", []
    nodes = [{"driver": "file", "node-name": "ovmf-code", "filename": str(fw.code), "read-only": True},
             {"driver": "file", "node-name": "ovmf-vars", "filename": str(fw.vars), "read-only": False}]
    return "pc,pflash0=ovmf-code,pflash1=ovmf-vars", [a for n in nodes for a in ("-blockdev", json.dumps(n))]


def _nic_args(m: Machine) -> list[str]:
    """User-mode networking with the port forwards, or (network: site) a tap on the site bridge from
    qemu-bridge-helper, which runs setuid for a job user and checks /etc/qemu/bridge.conf."""
    if m.net is None:
        netdev = "user,id=net0" + "".join(f",hostfwd={opt(rule)}" for rule in m.hostfwds())
        return ["-netdev", netdev, "-device", "virtio-net-pci,netdev=net0"]
    return ["-netdev", f"bridge,id=net0,br={opt(m.net.bridge)},helper={opt(m.net.helper)}",
            "-device", f"virtio-net-pci,netdev=net0,mac={opt(m.net.mac)},host_mtu={m.net.mtu}"]


def qemu_argv(m: Machine, qmp_path: Path, qemu: str = QEMU) -> tuple[list[str], list[int]]:
    """The command line and the descriptors the child must inherit. Every path reaches QEMU either
    as JSON (-blockdev) or with commas doubled (`opt`)."""
    machine, flash = _firmware_args(m)
    argv = [qemu, "-name", f"guest={opt(m.name)},process=salvus-{opt(m.name)}", *m.accel.qemu_args,
            "-machine", machine, *flash, "-m", str(m.memory_mb), "-smp", str(m.vcpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-qmp", f"unix:{opt(qmp_path)},server=on,wait=off",
            # The console is a socket `salvus_jobs console` attaches to, and everything the guest
            # writes also goes to the log. logappend=on: keep the wrapper's header and earlier boots
            # (QEMU truncates otherwise), and let consolelog.py cut the file in place under QEMU's
            # O_APPEND descriptor. With no client attached QEMU still logs (and drops) the output.
            "-chardev", f"socket,id=console,path={opt(m.console_socket)},server=on,wait=off,"
                        f"logfile={opt(m.console_log)},logappend=on", "-serial", "chardev:console",
            *_nic_args(m),
            "-chardev", f"socket,id=channel0,path={opt(m.channel_path)},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vser0",
            "-device", f"virtserialport,bus=vser0.0,chardev=channel0,name={CHANNEL_NAME}"]
    if m.kernel:
        # -kernel/-initrd/-append are single values QEMU does not split at commas.
        argv += ["-kernel", str(m.kernel), "-append", m.cmdline]
        if m.initrd:
            argv += ["-initrd", str(m.initrd)]
    fds: list[int] = []
    for i, d in enumerate(m.disks):
        # Firmware boots the root disk, never the config drive or a persistent disk.
        more, disk_fds = _blockdevs(i, d, bootindex=0 if i == 0 and not m.kernel else None)
        argv += more
        fds += disk_fds
    return argv, fds


class QemuRunner(VmRunner):
    kind = "qemu"

    def __init__(self, machine: Machine, qemu: str = QEMU) -> None:
        super().__init__(machine)
        self.qemu = qemu
        self.qmp_path = machine.channel_path.with_name("qmp.sock")
        self.stderr_path = machine.workdir / "qemu.stderr"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        argv, fds = qemu_argv(self.machine, self.qmp_path, self.qemu)
        log.debug("starting %s", " ".join(argv))
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, pass_fds=fds,
                                         preexec_fn=_die_with_parent, start_new_session=True)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def failure_detail(self) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace").strip()
        except OSError:
            text = ""
        code = self.proc.poll() if self.proc else None
        return "; ".join(filter(None, [f"qemu exited with status {code}" if code is not None else "",
                                       " ".join(text.splitlines()[-3:])]))

    def request_shutdown(self) -> None:
        try:
            qmp = Qmp(self.qmp_path)
        except QmpError:
            if self.alive():
                raise
            return
        try:
            qmp.execute("system_powerdown")
        finally:
            qmp.close()

    def destroy(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.destroy()
