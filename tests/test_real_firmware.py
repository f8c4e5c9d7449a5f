"""The real Debian 12 image as a whole disk (jobwrappers/debian_image.py, jobwrappers/wholedisk.py)
booted by firmware, as a site's cloud image is: no `boot:` in the role, so no `-kernel`; SeaBIOS
starts syslinux, OVMF starts systemd-boot, and either starts the image's own kernel, which finds its
root partition by PARTUUID. Two VMs booted together and shared by every assertion."""
from __future__ import annotations

import os

import pytest

from jobwrappers import debian_image
from tests.guest_ssh import new_key, spec_line, ssh_run

BOOT_TIMEOUT_S = 900  # as tests/test_real_guest.py: minutes under TCG, more when the cores are shared
pytestmark = [pytest.mark.slow, pytest.mark.vm, pytest.mark.timeout(BOOT_TIMEOUT_S + 600)]


@pytest.fixture(scope="module")
def guests(tmp_path_factory, run_wrapper_module):
    img = debian_image.build()
    tmp = tmp_path_factory.mktemp("real-firmware")
    key = new_key()
    role = f"""
    image: debian-disk@12
    image_path: {img.whole_disk}
    vcpus: 1
    memory_mb: 768
    port: 22
    boot_timeout: {BOOT_TIMEOUT_S}
    stop_timeout: 120
    probe: {{expect: "SSH-", timeout: 30}}"""
    spec = tmp / "cluster.yaml"
    spec.write_text(f"""\
store: {tmp / 'store'}
registry: {{ttl: 30, heartbeat_interval: 2}}
hypervisor: {{libvirt: never}}
catalogue: {{insecure_allow_unsigned: true}}
ssh_keys: ["{spec_line(key)}"]
roles:
  legacy:{role}
    firmware: bios
  uefi:{role}
    firmware: uefi
""")
    runs = {fw: run_wrapper_module(spec, fw, f"{fw}-disk-1") for fw in ("legacy", "uefi")}
    return {fw: (run, run.registered(timeout=BOOT_TIMEOUT_S)) for fw, run in runs.items()}, key, img




FACTS = "uname -r; findmnt -no SOURCE /; test -d /sys/firmware/efi && echo efi || echo no-efi"


@pytest.mark.parametrize("role,efi", [("legacy", "no-efi"), ("uefi", "efi")])
def test_firmware_boot_runs_the_images_own_kernel_from_its_own_disk(guests, role, efi):
    vms, key, img = guests
    run, svc = vms[role]
    release, root, firmware = ssh_run(svc, key, FACTS).split()
    assert release == img.kernel_release and release != os.uname().release
    assert root == "/dev/vda2"  # partition 2 of the whole disk, found by its PARTUUID
    assert firmware == efi  # /sys/firmware/efi exists only when UEFI started the kernel
    argv = run.qemu_argv()
    assert "-kernel" not in argv and "-initrd" not in argv
    assert any("pflash" in a for a in argv) == (role == "uefi")
    assert f"{'bios' if role == 'legacy' else 'uefi'} firmware boot" in run.output()
    assert "guest says 'READY" in run.output()  # cloud-init ran the agent from the config drive


def test_uefi_guest_stops_by_acpi_and_its_variable_store_goes_with_the_job(guests):
    vms, _, _ = guests
    run, _ = vms["uefi"]
    nvram = [d / "OVMF_VARS.fd" for d in run.scratch.glob("salvus-uefi-disk-1-*")]
    assert nvram and nvram[0].is_file()
    assert run.terminate(timeout=180) == 0
    assert "guest shut down in" in run.output()
    assert not nvram[0].exists() and list(run.scratch.iterdir()) == []
