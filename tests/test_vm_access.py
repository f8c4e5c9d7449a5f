"""`salvus_jobs ssh | exec | console` against two demo VMs booted once for the module (dropbear in
the demo image, its host key reported on the host channel and recorded by the wrapper), the real
command line as an operator runs it, interactive sessions driven through a pty (pexpect), and a real
OpenSSH server on this machine standing in for the hypervisor (`--jump`, a console from elsewhere)."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import paramiko
import pexpect
import pytest

from cluster import jobstatus
from cluster.jobstatus import JobStatus
from cluster.registry import Service, open_registry
from cluster.spec import load_spec
from cluster.ssh import fingerprint
from cluster.store import Store
from jobwrappers.machine import free_port
from tests.fixtures.demo_image import demo_spec_text
from tests.guest_ssh import new_key, spec_line

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, str(REPO / "salvus_jobs.py")]
pytestmark = [pytest.mark.vm, pytest.mark.timeout(300)]
SAGES = ("sage-acc-1", "sage-acc-2")


@pytest.fixture(scope="module")
def vms(tmp_path_factory, run_wrapper_module, demo_image):
    tmp = tmp_path_factory.mktemp("vm-access")
    key_file = tmp / "guest_key"
    key = new_key(key_file)
    # salvus_jobs as a hypervisor's install has it (beside scheduler.wrapper), for the remote console.
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "salvus_jobs"
    shim.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} {REPO / 'salvus_jobs.py'} \"$@\"\n")
    shim.chmod(0o755)
    text = demo_spec_text(demo_image, tmp / "store")
    text = re.sub(r'ssh_keys: \[.*\]', f'ssh_keys: ["{spec_line(key)}"]', text)
    text = text.replace("  sage:\n", f"  sage:\n    ssh_user: root\n    ssh_key_file: {key_file}\n", 1)
    text = text.replace("catalogue:", f"scheduler: {{wrapper: {bin_dir / 'salvus-vmjob'}}}\ncatalogue:", 1)
    spec = tmp / "cluster.yaml"
    spec.write_text(text)
    runs = [run_wrapper_module(spec, "sage", sid) for sid in SAGES]
    services = {run.service_id: run.registered() for run in runs}
    return spec, services, key_file


def cli(spec: Path, *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([*CLI, "--spec", str(spec), *args], capture_output=True, text=True, input=input,
                          timeout=timeout, env=env)


def registry(spec: Path):
    return open_registry(load_spec(spec))


def presented_key(svc: Service) -> paramiko.PKey:
    with socket.create_connection((svc.host, svc.ssh_port), timeout=30) as sock:
        t = paramiko.Transport(sock)
        try:
            t.start_client(timeout=30)
            return t.get_remote_server_key()
        finally:
            t.close()


def test_ssh_runs_a_command_on_the_vm_and_its_status_and_streams_pass_through(vms):
    spec, services, _ = vms
    svc = services["sage-acc-1"]
    # The wrapper recorded the key the guest's dropbear presents, at registration (before READY).
    key = presented_key(svc)
    assert svc.host_keys == f"{key.get_name()} {key.get_base64()}" and svc.ssh_port != svc.port
    r = cli(spec, "ssh", "sage-acc-1", "--", "hostname")
    assert (r.returncode, r.stdout, r.stderr) == (0, "sage-acc-1\n", "")
    r = cli(spec, "ssh", "sage-acc-1", "--", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")
    r = cli(spec, "ssh", "sage-acc-2", "--", "read x; echo got-$x", input="hello\n")
    assert (r.returncode, r.stdout) == (0, "got-hello\n")


def test_a_host_key_other_than_the_recorded_one_is_refused_naming_both(vms):
    spec, services, _ = vms
    real = services["sage-acc-1"]
    other = new_key()
    with registry(spec) as reg:
        # A row claiming sage-acc-1's endpoint with another key: what a swapped guest looks like.
        reg.register(Service("sage", "sage-swapped", real.host, real.port, ssh_port=real.ssh_port,
                             host_keys=f"{other.get_name()} {other.get_base64()}"))
        reg.register(Service("sage", "sage-nokeys", real.host, real.port, ssh_port=real.ssh_port))
    try:
        r = cli(spec, "ssh", "sage-swapped", "--", "hostname")
        assert r.returncode == 255 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert fingerprint(presented_key(real)) in r.stderr and fingerprint(other) in r.stderr
        assert "does not match" in r.stderr
        r = cli(spec, "ssh", "sage-nokeys", "--", "hostname")
        assert r.returncode == 255 and "recorded no SSH host keys" in r.stderr and r.stdout == ""
    finally:
        with registry(spec) as reg:
            reg.deregister("sage-swapped")
            reg.deregister("sage-nokeys")


def test_a_dead_endpoint_or_an_unknown_vm_exits_255(vms):
    spec, services, _ = vms
    real = services["sage-acc-1"]
    with registry(spec) as reg:
        reg.register(Service("hub", "hub-dead", "127.0.0.1", free_port(), ssh_port=free_port(),
                             host_keys=real.host_keys))
    try:
        r = cli(spec, "ssh", "hub-dead", "--", "hostname")
        assert r.returncode == 255 and "cannot connect" in r.stderr and r.stderr.count("\n") == 1
    finally:
        with registry(spec) as reg:
            reg.deregister("hub-dead")
    r = cli(spec, "ssh", "sage-nosuch", "--", "hostname")
    assert r.returncode == 255 and "no live service" in r.stderr


def test_exec_runs_on_every_vm_of_the_role(vms):
    spec, services, _ = vms
    r = cli(spec, "exec", "sage", "--", "hostname")
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == sorted([*(f"{s}: exit 0" for s in SAGES), *SAGES])
    r = cli(spec, "exec", "sage", "--parallel", "1", "--", "echo on $(hostname); test $(hostname) = sage-acc-1")
    assert r.returncode == 1
    blocks = dict(re.findall(r"^(sage-acc-\d): (exit \d+)\n", r.stdout, re.M))
    assert blocks == {"sage-acc-1": "exit 0", "sage-acc-2": "exit 1"} and "on sage-acc-2" in r.stdout
    with registry(spec) as reg:
        reg.register(Service("sage", "sage-gone", "127.0.0.1", free_port(), ssh_port=free_port(),
                             host_keys=services["sage-acc-1"].host_keys))
    try:
        r = cli(spec, "exec", "sage", "--", "true")
        assert r.returncode == 255
        assert "sage-gone: ssh failed: " in r.stdout and r.stdout.count(": exit 0") == 2
    finally:
        with registry(spec) as reg:
            reg.deregister("sage-gone")


def test_console_log_shows_the_boot(vms):
    spec, _, _ = vms
    r = cli(spec, "console", "sage-acc-2", "--log")
    assert r.returncode == 0, r.stderr
    assert "=== salvus-vmjob job " in r.stdout and "booting" in r.stdout
    assert "BusyBox" in r.stdout  # the demo guest's shell on ttyS0 started
    # A reader gone before the log is written (`| head` that has had enough): no error, no traceback.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    piped = subprocess.run(f"{' '.join(CLI)} --spec {spec} console sage-acc-2 --log | true",
                           shell=True, capture_output=True, text=True, timeout=60, env=env)
    assert piped.returncode == 0 and piped.stderr == ""


def _spawn(spec: Path, *args: str, cols: int = 100, rows: int = 30) -> pexpect.spawn:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm"}
    return pexpect.spawn(CLI[0], [CLI[1], "--spec", str(spec), *args], env=env, dimensions=(rows, cols),
                         timeout=30, encoding="utf-8", codec_errors="replace")


def test_console_attaches_read_write_and_detaches_with_ctrl_bracket(vms):
    spec, _, _ = vms
    c = _spawn(spec, "console", "sage-acc-1")
    try:
        c.expect("Ctrl-] detaches")
        c.sendline("echo console-$((6*7))")  # the guest's shell on the serial line answers
        c.expect("console-42")
        c.send("\x1d")
        c.expect("detached")
        c.expect(pexpect.EOF)
    finally:
        c.close(force=True)
    assert c.exitstatus == 0
    r = cli(spec, "console", "sage-acc-1", "--log")
    assert "console-42" in r.stdout  # what was typed and answered went to the log as well


def test_interactive_shell_on_a_pty_with_its_window_size_and_the_terminal_restored(vms):
    spec, _, _ = vms
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm"}
    cmd = " ".join([*CLI, "--spec", str(spec), "ssh", "sage-acc-2"])
    c = pexpect.spawn("/bin/sh", ["-c", f"stty -g; {cmd}; echo rc=$?; stty -g"], env=env, dimensions=(30, 100),
                      timeout=30, encoding="utf-8", codec_errors="replace")
    try:
        c.expect(r"([0-9a-f]+(?::[0-9a-f]+)+)\r\n")
        before = c.match.group(1)
        c.expect("# ")
        c.sendline("tty; stty size; echo $((6*7))")
        c.expect(r"/dev/pts/\d+\r\n30 100\r\n42\r\n")
        c.setwinsize(40, 120)  # SIGWINCH: the remote pty follows
        c.sendline("stty size")
        c.expect(r"40 120\r\n")
        c.sendline("exit 3")
        c.expect(r"rc=3\r\n")
        c.expect(r"([0-9a-f]+(?::[0-9a-f]+)+)\r\n")
        after = c.match.group(1)
        c.expect(pexpect.EOF)
    finally:
        c.close(force=True)
    assert before == after  # raw mode undone: the terminal is as it was


def test_jump_through_the_hypervisor_and_a_console_from_elsewhere(vms, sshd_server):
    spec, _, _ = vms
    hop = ["--jump", f"root@127.0.0.1:{sshd_server.port}", "--known-hosts", str(sshd_server.known_hosts),
           "--jump-key", str(sshd_server.client_key)]
    before = sshd_server.connections()
    r = cli(spec, "ssh", "sage-acc-1", *hop, "--", "hostname")
    assert (r.returncode, r.stdout) == (0, "sage-acc-1\n"), r.stderr
    r = cli(spec, "console", "sage-acc-1", "--log", *hop)
    assert r.returncode == 0, r.stderr
    assert "=== salvus-vmjob job " in r.stdout and "BusyBox" in r.stdout
    assert sshd_server.connections() - before == 2
    # The hypervisor's host key comes from known_hosts only: an empty one refuses it.
    empty = sshd_server.dir / "empty_known_hosts"
    empty.write_text("")
    r = cli(spec, "console", "sage-acc-1", "--log", *hop[:2], "--known-hosts", str(empty),
            "--jump-key", str(sshd_server.client_key))
    assert r.returncode == 255 and sshd_server.fingerprint() in r.stderr


def test_console_refuses_a_socket_its_status_file_does_not_own(vms, tmp_path):
    """Job users share state/jobs/: a status file naming someone else's socket gets no keystrokes."""
    spec, _, _ = vms
    sock_dir = tmp_path / "s"
    sock_dir.mkdir()
    planted = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    planted.bind(str(sock_dir / "console.sock"))
    planted.listen(1)
    os.chown(sock_dir / "console.sock", 65534, 65534)  # another user's socket
    store = Store.of(load_spec(spec))
    try:
        jobstatus.write(store, JobStatus("sage-planted", "sage", "p1", os.getpid(), "running", "", "",
                                         console_socket=str(sock_dir / "console.sock")))
        r = cli(spec, "console", "sage-planted", input="id\n")
        assert r.returncode == 255 and "is not its wrapper's console socket" in r.stderr
        planted.settimeout(0.5)
        with pytest.raises(socket.timeout):
            planted.accept()  # nothing connected to it
    finally:
        jobstatus.remove(store, "sage-planted", os.getpid())
        planted.close()
