"""Firmware boot: a whole-disk image (GPT, ESP with syslinux and systemd-boot, root partition) boots
its own bootloader and kernel under SeaBIOS and under OVMF, on the plain-QEMU path and on the
libvirt path, with the UEFI variable store a per-VM copy that goes with the job's scratch. The
demo guest's whole disk boots in seconds; tests/test_real_firmware.py boots the real Debian one."""
from __future__ import annotations

import json
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from cluster.errors import SpecError
from cluster.spec import load_spec, parse_spec
from cluster.store import Store
from jobwrappers.accel import TCG
from jobwrappers.demo_image import find_kernel, kernel_release
from jobwrappers.firmware import DIRECT, Firmware, prepare_firmware
from jobwrappers.libvirt_runner import render_domain_xml
from jobwrappers.machine import Disk, Machine
from jobwrappers.qemu_runner import qemu_argv
from tests.test_vmjob import ask

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")


def firmware_spec(path: Path, disk: Path, firmware: str, store: Path, **hypervisor: str) -> Path:
    hv = {"libvirt": "never", "boot_timeout": 150, "stop_timeout": 15, **hypervisor}
    path.write_text(f"""\
store: {store}
registry: {{ttl: 6, heartbeat_interval: 1}}
hypervisor: {{{', '.join(f'{k}: {v}' for k, v in hv.items())}}}
catalogue: {{insecure_allow_unsigned: true}}
roles:
  sage:
    image: demo-disk@1
    image_path: {disk}
    firmware: {firmware}
    memory_mb: 192  # the least firmware: uefi accepts
    port: 6000
    probe: {{send: "1+1\\n", expect: "2"}}
""")
    return path


@pytest.fixture(scope="module")
def booted(demo_whole_disk, tmp_path_factory, run_wrapper_module):
    """One BIOS and one UEFI VM of the demo whole disk, booted together (plain QEMU)."""
    tmp = tmp_path_factory.mktemp("firmware")
    runs = {fw: run_wrapper_module(firmware_spec(tmp / f"{fw}.yaml", demo_whole_disk, fw, tmp / f"store-{fw}"),
                                   "sage", f"sage-{fw}")
            for fw in ("bios", "uefi")}
    return {fw: (run, run.registered()) for fw, run in runs.items()}


def console_text(run) -> str:
    return Store.of(run.spec).console_log(run.service_id).read_text(errors="replace")


@pytest.mark.vm
def test_bios_boots_the_disks_own_bootloader_and_kernel(booted):
    run, svc = booted["bios"]
    assert ask(svc.host, svc.port, "6*7") == "42\n"
    argv = run.qemu_argv()
    assert "-kernel" not in argv and not any("pflash" in a for a in argv)
    assert any(a.startswith("virtio-blk-pci,drive=disk0") and a.endswith(",bootindex=0") for a in argv)
    log = console_text(run)
    # syslinux names the kernel it loaded BOOT_IMAGE; the kernel is the disk's (the ESP's) one.
    assert f"Linux version {kernel_release(find_kernel()[0])} " in log
    assert "Command line: BOOT_IMAGE=/vmlinuz " in log and "efi: EFI v" not in log
    assert "bios firmware boot" in run.output()


@pytest.mark.vm
def test_uefi_boots_by_ovmf_with_a_private_variable_store(booted):
    run, svc = booted["uefi"]
    assert ask(svc.host, svc.port, "2**8") == "256\n"
    argv = run.qemu_argv()
    assert "-kernel" not in argv and "pc,pflash0=ovmf-code,pflash1=ovmf-vars" in argv
    nvram = [d / "OVMF_VARS.fd" for d in run.scratch.glob("salvus-sage-uefi-*")]
    assert nvram and nvram[0].is_file() and any(str(nvram[0]) in a for a in argv)
    assert stat.S_IMODE(nvram[0].stat().st_mode) == 0o600
    log = console_text(run)
    assert "efi: EFI v" in log  # the kernel found EFI system tables: started by UEFI firmware
    assert "Command line: initrd=\\initrd.img " in log  # systemd-boot's spelling, not syslinux's
    assert run.terminate() == 0
    assert "guest shut down" in run.output()
    assert not nvram[0].exists() and list(run.scratch.iterdir()) == []


@pytest.mark.vm
def test_uefi_boot_through_libvirt_keeps_nvram_in_the_jobs_scratch(demo_whole_disk, libvirt_uri, tmp_path,
                                                                   run_wrapper):
    spec = firmware_spec(tmp_path / "uefi.yaml", demo_whole_disk, "uefi", tmp_path / "store",
                         libvirt=f'"{libvirt_uri}"')
    nvram_dir = Path("/var/lib/libvirt/qemu/nvram")
    before = set(nvram_dir.iterdir()) if nvram_dir.is_dir() else set()
    conn = libvirt.open(libvirt_uri)
    try:
        run = run_wrapper(spec, "sage", "sage-lvefi")
        svc = run.registered()
        assert ask(svc.host, svc.port, "3*3") == "9\n"
        os_el = ET.fromstring(conn.lookupByName("salvus-sage-lvefi").XMLDesc()).find("os")
        assert os_el.find("loader").text == str(OVMF_CODE) and os_el.find("kernel") is None
        assert Path(os_el.find("nvram").text).parent.parent == run.scratch
        assert "efi: EFI v" in console_text(run)
        assert run.terminate() == 0
        assert list(run.scratch.iterdir()) == []
        after = set(nvram_dir.iterdir()) if nvram_dir.is_dir() else set()
        assert after == before, "libvirt must not keep a variable store of its own"
    finally:
        conn.close()


# -- rendering, no VM ------------------------------------------------------------------------------

def machine(tmp_path: Path, firmware: Firmware = DIRECT, kernel: Path | None = None) -> Machine:
    return Machine(name="sage-1", vcpus=1, memory_mb=128, accel=TCG,
                   disks=[Disk(tmp_path / "root.qcow2", "qcow2"), Disk(tmp_path / "cidata.iso", "raw", readonly=True)],
                   guest_port=6000, host_addr="127.0.0.1", host_port=20000, channel_path=tmp_path / "c.sock",
                   console_log=tmp_path / "console.log", workdir=tmp_path, kernel=kernel, firmware=firmware)


def _os_and_disks(xml: str) -> tuple[ET.Element, list[ET.Element]]:
    root = ET.fromstring(xml)
    return root.find("os"), root.find("devices").findall("disk")


def test_domain_xml_bios_boots_the_root_disk(tmp_path):
    os_el, disks = _os_and_disks(render_domain_xml(machine(tmp_path, Firmware("bios"))))
    assert os_el.find("loader") is None and os_el.find("boot") is None and os_el.find("kernel") is None
    assert [d.find("boot").get("order") if d.find("boot") is not None else None for d in disks] == ["1", None]


def test_domain_xml_uefi_names_the_per_vm_variable_store_escaped(tmp_path):
    odd = tmp_path / "a'b<c>&d"
    odd.mkdir()
    fw = Firmware("uefi", code=OVMF_CODE, vars=odd / "OVMF_VARS.fd")
    os_el, disks = _os_and_disks(render_domain_xml(machine(odd, fw)))
    loader = os_el.find("loader")
    assert (loader.text, loader.get("type"), loader.get("readonly")) == (str(OVMF_CODE), "pflash", "yes")
    assert os_el.find("nvram").text == str(odd / "OVMF_VARS.fd")
    assert disks[0].find("boot").get("order") == "1"


def test_direct_boot_renders_no_firmware_and_no_boot_order(tmp_path):
    m = machine(tmp_path, kernel=tmp_path / "boot-kernel")
    os_el, disks = _os_and_disks(render_domain_xml(m))
    assert os_el.find("kernel").text == str(tmp_path / "boot-kernel") and os_el.find("loader") is None
    assert all(d.find("boot") is None for d in disks)
    argv, _ = qemu_argv(m, tmp_path / "qmp.sock")
    assert "-kernel" in argv and not any("bootindex" in a for a in argv)


def test_qemu_argv_uefi_flash_nodes_are_json(tmp_path):
    odd = tmp_path / "x,readonly=off"
    fw = Firmware("uefi", code=OVMF_CODE, vars=odd)
    argv, _ = qemu_argv(machine(tmp_path, fw), tmp_path / "qmp.sock")
    assert argv[argv.index("-machine") + 1] == "pc,pflash0=ovmf-code,pflash1=ovmf-vars"
    nodes = {n["node-name"]: n for n in (json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev")}
    assert nodes["ovmf-vars"]["filename"] == str(odd) and nodes["ovmf-vars"]["read-only"] is False
    assert nodes["ovmf-code"]["read-only"] is True


def test_uefi_with_direct_boot_is_refused_and_missing_ovmf_is_78(tmp_path):
    with pytest.raises(SpecError, match="firmware 'uefi' applies to images booted by firmware"):
        parse_spec("roles: {sage: {image: a@1, port: 1, firmware: uefi, memory_mb: 256, boot: {kernel: /k}}}\n", tmp_path / "c.yaml")
    with pytest.raises(SpecError, match="expected one of|bios|uefi"):
        parse_spec("roles: {sage: {image: a@1, port: 1, firmware: coreboot}}\n", tmp_path / "c.yaml")
    with pytest.raises(SpecError, match="firmware 'uefi' needs memory_mb >= 192"):
        parse_spec("roles: {sage: {image: a@1, port: 1, firmware: uefi, memory_mb: 128}}\n", tmp_path / "c.yaml")
    spec = tmp_path / "c.yaml"
    spec.write_text("hypervisor: {ovmf: {code: /nonexistent/OVMF_CODE.fd}}\n"
                    "roles: {sage: {image: a@1, port: 1, firmware: uefi, memory_mb: 256}}\n")
    with pytest.raises(SpecError, match=r"hypervisor.ovmf.code: /nonexistent/OVMF_CODE.fd is not a file"):
        prepare_firmware(load_spec(spec), "sage", tmp_path)
    assert list(tmp_path.glob("OVMF_VARS*")) == []  # nothing written before the refusal
