"""salvus-vmjob through libvirt (a libvirtd started by the fixture), with a site domain template."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import libvirt
import libvirt_qemu
import pytest

from cluster.registry import open_registry
from jobwrappers.libvirt_runner import DEFAULT_TEMPLATE
from tests.fixtures.demo_image import demo_spec_text, pid_alive
from tests.polling import wait_for
from tests.test_vmjob import ask

pytestmark = pytest.mark.vm


def qemu_pid(name: str) -> int | None:
    try:
        return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
    except (OSError, ValueError):
        return None


def transient(conn, name: str) -> bool:
    try:
        return not conn.lookupByName(name).isPersistent()
    except libvirt.libvirtError:
        return False


@pytest.fixture
def libvirt_spec(tmp_path, demo_image, libvirt_uri) -> Path:
    template = tmp_path / "site-domain.xml"
    template.write_text(DEFAULT_TEMPLATE.read_text().replace(
        "<name>${name}</name>", "<name>${name}</name>\n  <description>site template</description>"))
    spec = tmp_path / "cluster.yaml"
    spec.write_text(demo_spec_text(demo_image, tmp_path / "store", libvirt=f'"{libvirt_uri}"',
                                   domain_template=str(template)))
    return spec


def test_libvirt_boot_register_stop_and_sigkill(libvirt_spec, libvirt_uri, run_wrapper):
    conn = libvirt.open(libvirt_uri)
    try:
        run = run_wrapper(libvirt_spec, "sage", "sage-lv")
        svc = run.registered()
        assert "libvirt VM under" in run.output()
        dom = conn.lookupByName("salvus-sage-lv")
        assert not dom.isPersistent(), "the domain must be transient"
        assert "<description>site template</description>" in dom.XMLDesc()
        nodes = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute": "query-named-block-nodes"}', 0))
        assert [n["drv"] for n in nodes["return"] if n["file"].startswith("/dev/fdset/")] == ["qcow2", "file"], \
            "libvirt's QEMU must read the base from the verified descriptor (FDAssociate), not by name"
        assert ask(svc.host, svc.port, "2**10") == "1024\n"
        # The serial console is a socket with its log (`salvus_jobs console`), sshd a second forward.
        status = json.loads(Path(run.spec.store, "state", "jobs", "sage-lv.json").read_text())
        assert Path(status["console_socket"]).is_socket()
        wait_for(lambda: b"BusyBox" in Path(status["console_log"]).read_bytes(), 30, "the guest's console in its log")
        assert svc.host_keys.startswith("ssh-ed25519 ") and svc.ssh_port not in (0, svc.port)
        pid = qemu_pid("salvus-sage-lv")
        assert pid and pid_alive(pid)
        t0 = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(30) == 0, run.output()
        assert time.monotonic() - t0 < run.spec.hypervisor.stop_timeout
        assert "guest shut down" in run.output()
        assert "salvus-sage-lv" not in [d.name() for d in conn.listAllDomains()]
        assert list(run.scratch.iterdir()) == []
        with open_registry(run.spec) as reg:
            assert reg.get("sage-lv") is None

        # AUTODESTROY: a SIGKILLed wrapper's connection closes and libvirt destroys its domain.
        # (Killed inside the ~1 s of the start itself, between define and undefine, the wrapper would
        # leave an inactive definition, never a running VM: the kill waits until it is transient.)
        # An inactive definition such a kill leaves must not block the name for good.
        if not any(d.name() == "salvus-sage-lk" for d in conn.listAllDomains()):
            conn.defineXML("<domain type='qemu'><name>salvus-sage-lk</name><memory unit='MiB'>64</memory>"
                           "<os><type arch='x86_64' machine='pc'>hvm</type></os></domain>")
        run = run_wrapper(libvirt_spec, "sage", "sage-lk")
        pid = wait_for(lambda: qemu_pid("salvus-sage-lk") if transient(conn, "salvus-sage-lk") else None, 60,
                       "the domain to start")
        run.proc.send_signal(signal.SIGKILL)
        run.proc.wait(5)
        # qemu dies first; libvirt drops the domain from its list a moment later, within the 5 s too.
        wait_for(lambda: not pid_alive(pid) and "salvus-sage-lk" not in [d.name() for d in conn.listAllDomains()],
                 5, "libvirt to destroy the dead wrapper's domain")
    finally:
        conn.close()
