"""The guest agent's delivery (cloud-config bootcmd), the host side of its protocol (host keys read
strictly, bounded lines), the role's readiness modes, and the demo image under `readiness: probe`
and under an agent that never reports."""
from __future__ import annotations

import base64
import shlex
import socket
import subprocess
import threading
import time

import pytest
import yaml

from cluster.errors import SpecError
from cluster.spec import parse_spec
from jobwrappers.agent import GuestReports, parse_host_key
from jobwrappers.configdrive import AGENT, GuestConfig, user_data
from jobwrappers.probe import MAX_LINE, HostChannel
from submit.base import CLEANUP_GRACE_S, JobResources
from tests.fixtures.demo_image import demo_spec_text

ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOr5a3bPpvs0sh8Q7dS8f3bA6Z+vKkIY3m5x0V8xY0cC"


def test_user_data_installs_the_agent_from_bootcmd_with_its_settings(tmp_path):
    cfg = GuestConfig("hub-1", "hub", "hub-1", 8080, "hub-1.7", upstreams=["10.0.2.2:6000"],
                      reload="systemctl reload nginx")
    doc = yaml.safe_load(user_data(cfg))
    assert "runcmd" not in doc and len(doc["bootcmd"]) == 1
    cmd = doc["bootcmd"][0]
    subprocess.run(["sh", "-n", "-c", cmd], check=True)
    blobs = [w for w in shlex.split(cmd.replace(";", " ; ")) if len(w) > 40]
    env, agent = (base64.b64decode(b).decode() for b in blobs)
    assert agent == AGENT.read_text()
    assert "SALVUS_RELOAD='systemctl reload nginx'\n" in env and "SALVUS_PORT=8080\n" in env
    # Outlives cloud-init (setsid without systemd); not ordered after sysinit.target, which waits
    # for cloud-init.service, which runs this very command.
    assert "systemd-run --no-block --quiet --unit=salvus-agent -p DefaultDependencies=no" in cmd
    subprocess.run(["sh", "-n", str(AGENT)], check=True)


@pytest.mark.parametrize("line", [
    f"HOSTKEY {ED25519.split()[1]}",  # no type
    f"HOSTKEY ssh-dss {ED25519.split()[1]}",  # unknown type
    f"HOSTKEY ssh-rsa {ED25519.split()[1]}",  # data of another type
    f"{'HOSTKEY ' + ED25519} comment",  # not a full match
    f"HOSTKEY ssh-ed25519 {'A' * 5000}",  # too long
    f"HOSTKEY {ED25519}\x1b[2J",
])
def test_malformed_host_key_lines_are_dropped(line):
    assert parse_host_key(line) is None
    r = GuestReports()
    r.take(line)
    r.take("HOSTKEYS-DONE")
    assert r.host_keys == "" and r.keys_changed


def test_host_keys_are_recorded_when_the_agent_is_done():
    r = GuestReports()
    r.take(f"HOSTKEY {ED25519}")
    assert r.host_keys == "" and not r.keys_changed
    r.take(f"HOSTKEY {ED25519}")  # a repeat counts once
    r.take("HOSTKEYS-DONE")
    assert r.host_keys == ED25519 and r.keys_changed
    r.take("CLOUD-INIT-FINAL")
    assert r.cloud_init_final


def test_host_channel_drops_an_over_long_line_and_keeps_the_next(tmp_path):
    path = tmp_path / "ch.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    ch = HostChannel(path)
    ch.connect(time.monotonic() + 5, lambda: True)
    peer, _ = server.accept()

    def guest() -> None:
        peer.sendall(b"X" * (MAX_LINE * 3) + b"\nHOSTKEYS-DONE\nREADY sage s1\n")

    t = threading.Thread(target=guest)
    t.start()
    seen: list[str] = []
    assert ch.wait_for("READY", time.monotonic() + 10, lambda: True, other=seen.append) == "READY sage s1"
    t.join()
    assert seen == ["HOSTKEYS-DONE"]
    peer.sendall(b"CLOUD-INIT-FINAL\n")
    deadline = time.monotonic() + 5
    while (lines := ch.poll_lines()) == [] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lines == ["CLOUD-INIT-FINAL"]
    ch.close()
    peer.close()
    server.close()


@pytest.mark.parametrize("family, addr", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_agent_sees_a_listening_port_in_proc_net_tcp(family, addr):
    """The agent's port check (shell builtins only) on this host's real /proc/net/tcp{,6}."""
    with socket.socket(family) as srv:
        srv.bind((addr, 0))
        port = srv.getsockname()[1]
        check = f". {shlex.quote(str(AGENT))}; listening {port:04X} && echo listens; echo done"
        assert subprocess.run(["dash", "-c", check], capture_output=True, text=True).stdout == "done\n"
        srv.listen(1)
        assert subprocess.run(["dash", "-c", check], capture_output=True, text=True).stdout == "listens\ndone\n"


def _role(extra: str, tmp_path):
    text = f"roles:\n  sage:\n    image: demo@1\n    port: 6000\n{extra}"
    return parse_spec(text, tmp_path / "cluster.yaml").roles["sage"]


def test_readiness_boot_timeout_and_reload_are_role_settings(tmp_path):
    role = _role("    readiness: cloud-init-final\n    boot_timeout: 400\n    stop_timeout: 90\n"
                 "    reload: systemctl reload nginx\n", tmp_path)
    assert (role.readiness, role.boot_timeout, role.stop_timeout, role.reload) == (
        "cloud-init-final", 400, 90, "systemctl reload nginx")
    default = _role("", tmp_path)
    assert (default.readiness, default.boot_timeout, default.stop_timeout, default.reload) == ("agent", None, None, None)
    spec = parse_spec("roles:\n  hub: {image: demo@1, port: 8080}\n  sage: {image: demo@1, port: 6000, "
                      "stop_timeout: 90.5, boot_timeout: 600}\n", tmp_path / "c.yaml")
    assert (spec.boot_timeout("hub"), spec.stop_timeout("hub")) == (spec.hypervisor.boot_timeout, spec.hypervisor.stop_timeout)
    assert (spec.boot_timeout("sage"), spec.stop_timeout("sage")) == (600, 90.5)
    # The scheduler's SIGTERM -> SIGKILL grace covers the role's own stop window.
    assert JobResources.of(spec, "sage").grace_s == 91 + CLEANUP_GRACE_S
    assert JobResources.of(spec, "hub").grace_s == spec.hypervisor.stop_timeout + CLEANUP_GRACE_S


@pytest.mark.parametrize("extra, field", [
    ("    readiness: ssh\n", "roles.sage.readiness"),
    ("    reload: \"a\\nb\"\n", "roles.sage.reload"),
    ("    boot_timeout: 0\n", "roles.sage.boot_timeout"),
    ("    stop_timeout: -1\n", "roles.sage.stop_timeout"),
])
def test_bad_role_readiness_settings_are_one_line(extra, field, tmp_path):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")) as e:
        _role(extra, tmp_path)
    assert "\n" not in str(e.value)


def _demo_sage_with(line: str, tmp_path, demo_image):
    """The demo spec with `line` added to its sage role."""
    spec = tmp_path / "cluster.yaml"
    spec.write_text(demo_spec_text(demo_image, tmp_path / "store").replace(
        "    port: 6000\n", f"    port: 6000\n    {line}\n", 1))
    return spec


@pytest.mark.vm
def test_readiness_probe_registers_the_demo_guest(tmp_path, demo_image, run_wrapper):
    run = run_wrapper(_demo_sage_with("readiness: probe", tmp_path, demo_image), "sage", "sage-probe")
    svc = run.registered(timeout=150)
    assert svc.role == "sage" and "guest says" not in run.output()  # READY was not what it waited for
    assert "s after the probe's first answer)" in run.output()
    assert run.terminate() == 0


@pytest.mark.vm
def test_agent_never_reports_exits_75_naming_what_was_awaited(tmp_path, demo_image, run_wrapper):
    # The role's own boot_timeout wins over the hypervisor's (150 s in the demo spec).
    run = run_wrapper(_demo_sage_with("boot_timeout: 3", tmp_path, demo_image), "sage", "sage-mute")
    assert run.proc.wait(60) == 75
    lines = [line for line in run.err.read_text().splitlines() if "did not become ready" in line]
    assert len(lines) == 1, run.output()
    assert ("sage-mute did not become ready within 3 s: no READY on the host channel: does the image run "
            "cloud-init (or the salvus agent)? see console log ") in lines[0]
    assert lines[0].endswith("logs/console/sage-mute.log")
    assert "Traceback" not in run.output()
