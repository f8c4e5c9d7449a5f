"""salvus-vmjob with real QEMU guests (TCG here) booting the demo image through plain QEMU."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from cluster.registry import open_registry
from salvus_jobs import http_get
from tests.conftest import run_cli
from tests.fixtures.demo_image import demo_spec_text, pid_alive
from tests.polling import wait_for

pytestmark = pytest.mark.vm


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ask(host: str, port: int, line: str, timeout: float = 10) -> str:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(line.encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.decode()


@pytest.fixture
def spec_path(tmp_path, demo_image) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(demo_spec_text(demo_image, tmp_path / "store"))
    return path


def test_hub_and_sage_boot_register_forward_and_stop_cleanly(spec_path, demo_image, run_wrapper):
    """One hub and one sage VM: READY -> registered -> probe; the hub learns the sage that registers
    after it and forwards a computation to it; the base is untouched; SIGTERM cleans up."""
    base_sum = sha256(demo_image.disk)
    hub = run_wrapper(spec_path, "hub", "hub-0")
    hub_svc = hub.registered()
    assert (hub_svc.role, hub_svc.host, hub_svc.scheduler, hub_svc.job_id, hub_svc.image) == \
        ("hub", "127.0.0.1", "local", "t0", "demo@1")
    status, body = http_get(hub_svc.host, hub_svc.port, "/")
    assert status == 200 and json.loads(body) == {"role": "hub", "name": "hub-0", "service_id": "hub-0", "sages": []}
    assert http_get(hub_svc.host, hub_svc.port, "/compute?expr=1%2B1")[0] == 503

    sage = run_wrapper(spec_path, "sage", "sage-0")
    sage_svc = sage.registered()
    assert ask(sage_svc.host, sage_svc.port, "6*7") == "42\n"
    assert ask(sage_svc.host, sage_svc.port, "rm -rf /") == "error: expected an integer expression\n"
    # The hub's wrapper pushes the newly registered sage to its guest over the host channel.
    wait_for(lambda: json.loads(http_get(hub_svc.host, hub_svc.port, "/")[1])["sages"] ==
             [f"10.0.2.2:{sage_svc.port}"], 20, "the hub to learn the sage")
    assert http_get(hub_svc.host, hub_svc.port, "/compute?expr=%282%2B3%29*7") == (200, "35\n")

    store = spec_path.parent / "store"
    state = json.loads((store / "state" / "jobs" / "sage-0.json").read_text())
    assert state["state"] == "running" and state["endpoint"] == f"127.0.0.1:{sage_svc.port}"
    console = Path(state["console_log"])
    assert str(console) in sage.output() and "Power down" not in console.read_text()
    # One warning for the unsigned demo image, at most one for TCG, nothing else.
    warnings = [line for line in sage.err.read_text().splitlines() if " WARNING: " in line]
    assert sum("insecure_allow_unsigned" in w for w in warnings) == 1
    assert sum("TCG" in w for w in warnings) <= 1 and len(warnings) <= 2, warnings
    # The guest wrote its root disk (hostname, SSH keys) into the overlay, never into the base.
    overlays = list(sage.scratch.glob("salvus-sage-0-*/root.qcow2"))
    assert len(overlays) == 1 and overlays[0].stat().st_size > 300 * 1024
    qemu = sage.qemu_pids()
    assert len(qemu) == 1

    t0 = time.monotonic()
    sage.proc.send_signal(signal.SIGTERM)
    assert sage.proc.wait(30) == 0, sage.output()
    assert time.monotonic() - t0 < sage.spec.hypervisor.stop_timeout
    assert "guest shut down" in sage.output() and "Power down" in console.read_text()
    assert not pid_alive(qemu[0])
    assert list(sage.scratch.iterdir()) == [], "overlay and config drive must be removed"
    assert not (store / "state" / "jobs" / "sage-0.json").exists()
    with open_registry(sage.spec) as reg:
        assert reg.get("sage-0") is None and reg.get("hub-0") is not None
    wait_for(lambda: json.loads(http_get(hub_svc.host, hub_svc.port, "/")[1])["sages"] == [], 20,
             "the hub to forget the stopped sage")
    assert hub.terminate() == 0
    assert sha256(demo_image.disk) == base_sum


def test_cassandra_keeps_its_data_across_three_restarts(spec_path, run_wrapper):
    store = spec_path.parent / "store"
    disk = store / "persistent" / "cassandra-0" / "data.qcow2"
    for boot in (1, 2, 3):
        run = run_wrapper(spec_path, "cassandra", "cassandra-0", job_id=f"c{boot}")
        svc = run.registered()
        assert ask(svc.host, svc.port, "") == f"cassandra cassandra-0 boots={boot} data=/data\n"
        if boot < 3:
            assert run.terminate() == 0, run.output()
        assert disk.is_file(), "the wrapper must never delete a persistent disk"
    # The last time the VM dies under the wrapper: deregistered, cleaned up, exit 75 (retry).
    qemu = run.qemu_pids()
    assert len(qemu) == 1
    os.kill(qemu[0], signal.SIGKILL)
    assert run.proc.wait(30) == 75, run.output()
    assert "guest cassandra-0 died" in run.err.read_text()
    with open_registry(run.spec) as reg:
        assert reg.get("cassandra-0") is None
    assert list(run.scratch.iterdir()) == [] and disk.is_file()


def test_sigkill_of_the_wrapper_leaves_no_qemu(spec_path, run_wrapper):
    run = run_wrapper(spec_path, "sage", "sage-k")
    qemu = wait_for(run.qemu_pids, 30, "qemu to start")
    run.proc.send_signal(signal.SIGKILL)
    run.proc.wait(5)
    wait_for(lambda: not pid_alive(qemu[0]), 5, "qemu to die with its wrapper")


def test_boot_timeout_is_temporary_failure_and_removes_the_overlay(tmp_path, demo_image, run_wrapper):
    spec = tmp_path / "cluster.yaml"
    spec.write_text(demo_spec_text(demo_image, tmp_path / "store", boot_timeout=2))
    run = run_wrapper(spec, "sage", "sage-slow")
    assert run.proc.wait(60) == 75
    assert "did not become ready within 2 s" in run.err.read_text()
    assert list(run.scratch.iterdir()) == []
    assert not (tmp_path / "store" / "state" / "jobs" / "sage-slow.json").exists()


def test_missing_image_exits_65_and_creates_nothing(tmp_path, demo_image):
    spec = tmp_path / "cluster.yaml"
    spec.write_text(demo_spec_text(demo_image, tmp_path / "store").replace(
        str(demo_image.disk), str(tmp_path / "gone.qcow2")))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    r = run_cli("--spec", str(spec), "--role", "sage", program="salvus-vmjob", env={"TMPDIR": str(scratch)})
    assert r.returncode == 65
    errors = [line for line in r.stderr.splitlines() if line.startswith("salvus-vmjob:")]
    assert len(errors) == 1 and "gone.qcow2" in errors[0] and "missing" in errors[0]
    assert list(scratch.iterdir()) == [] and not (tmp_path / "store" / "state" / "jobs").exists()


def test_unknown_role_exits_78(spec_path, tmp_path):
    r = run_cli("--spec", str(spec_path), "--role", "nosuch", program="salvus-vmjob",
                env={"TMPDIR": str(tmp_path)})
    assert r.returncode == 78
    assert r.stderr.strip().splitlines()[-1] == (
        f"salvus-vmjob: {spec_path}: roles.nosuch: no such role (the spec defines: cassandra, hub, sage)")


def test_sigterm_while_booting_stops_cleanly_with_0(spec_path, run_wrapper):
    run = run_wrapper(spec_path, "sage", "sage-early")
    qemu = wait_for(run.qemu_pids, 30, "qemu to start")
    state = spec_path.parent / "store" / "state" / "jobs" / "sage-early.json"
    booting = wait_for(lambda: state.exists() and json.loads(state.read_text()), 10, "the status file")
    assert booting["state"] == "booting" and booting["pid"] == run.proc.pid
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(20) == 0, run.output()
    assert not pid_alive(qemu[0]) and list(run.scratch.iterdir()) == [] and not state.exists()


def test_unreachable_registry_at_start_exits_75_and_creates_nothing(tmp_path, demo_image):
    spec = tmp_path / "cluster.yaml"
    spec.write_text(demo_spec_text(demo_image, tmp_path / "store").replace(
        "registry: {", "registry: {sqlite: /proc/no-such-dir/registry.sqlite, "))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    r = run_cli("--spec", str(spec), "--role", "sage", program="salvus-vmjob", env={"TMPDIR": str(scratch)})
    assert r.returncode == 75, r.stderr
    assert "registry" in r.stderr.strip().splitlines()[-1]
    assert list(scratch.iterdir()) == []
