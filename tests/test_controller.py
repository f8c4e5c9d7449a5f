"""`salvus_jobs controller` on the local executor with real demo VMs: dead and hung VMs replaced,
no duplicates after a supervisor is killed, one controller at a time, a paused leader fenced,
status and metrics over HTTP."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.registry import open_registry
from cluster.spec import load_spec
from submit import open_backend
from tests.fixtures.demo_image import demo_spec_text, pid_alive, store_qemu_pids
from tests.polling import wait_for
from tests.fixtures.slurm import KILL_WAIT
from tests.submit_support import scheduler_spec, stop_everything_after  # noqa: F401 (fixture)

pytestmark = pytest.mark.vm  # and the last test also slurm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_spec(tmp_path: Path, demo_image, name: str = "cluster.yaml", port: int | None = None) -> Path:
    path = tmp_path / name
    port = port or free_port()
    path.write_text(f"site: ctl\nscheduler: {{backend: local}}\n"
                    f"controller: {{interval: 1, lease: 4, listen: '127.0.0.1:{port}', unhealthy_after: 2, "
                    f"probe_timeout: 1, cancel_after: 2}}\n"
                    + demo_spec_text(demo_image, tmp_path / "store"))
    return path


class ControllerProc:
    """A `salvus_jobs controller` process, its stderr in a file."""

    def __init__(self, spec: Path, log: Path) -> None:
        self.spec, self.log = spec, log
        exe = Path(sys.executable).parent / "salvus_jobs"
        self.err = open(log, "w")
        self.proc = subprocess.Popen([str(exe), "--spec", str(spec), "controller"], stdout=subprocess.DEVNULL,
                                     stderr=self.err, env=os.environ.copy())
        self.port = load_spec(spec).controller.listen.rpartition(":")[2]

    def text(self) -> str:
        return self.log.read_text()

    def wait_log(self, needle: str, timeout: float = 60, after: int = 0) -> int:
        """Waits until `needle` is in the log past offset `after`; returns the offset after it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            at = text.find(needle, after)
            if at >= 0:
                return at + len(needle)
            assert self.proc.poll() is None, f"controller exited {self.proc.returncode}:\n{text}"
            time.sleep(0.2)
        raise AssertionError(f"{needle!r} not logged within {timeout}s:\n{self.text()[-4000:]}")

    def get(self, path: str) -> tuple[str, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
            return r.headers["Content-Type"], r.read().decode()

    def status(self) -> dict:
        return json.loads(self.get("/status")[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


@pytest.fixture
def controllers():
    started: list[ControllerProc] = []

    def start(spec: Path, log: Path) -> ControllerProc:
        c = ControllerProc(spec, log)
        started.append(c)
        return c
    yield start
    for c in started:
        c.stop()


def registered(spec: Path, role: str = "sage") -> list:
    with open_registry(load_spec(spec)) as reg:
        return reg.lookup(role)


def qemu_pids(spec: Path) -> list[int]:
    return store_qemu_pids(load_spec(spec).store_path)


def wrapper_of(spec: Path, job_id: str) -> int:
    st = json.loads((load_spec(spec).store_path / "state" / "local-jobs" / f"{job_id}.state").read_text())
    return st["wrapper_pid"]


def qemu_of(wrapper_pid: int) -> int:
    children = Path(f"/proc/{wrapper_pid}/task/{wrapper_pid}/children").read_text().split()
    return next(int(c) for c in children if b"qemu-system" in Path(f"/proc/{c}/cmdline").read_bytes().split(b"\0")[0])


def healthy_one(c: ControllerProc, exclude: set[str] = frozenset()) -> dict | None:
    """The controller's view once sage is exactly one healthy registered service not in `exclude`."""
    st = c.status()
    jobs = [j for j in st.get("jobs", []) if j["role"] == "sage" and j["state"] in ("queued", "running")]
    if (st.get("roles", {}).get("sage", {}).get("healthy") == 1 and len(jobs) == 1
            and jobs[0]["health"] == "healthy" and jobs[0]["service_id"] not in exclude):
        return jobs[0]
    return None


def test_controller_replaces_a_dead_vm_and_a_hung_guest_and_serves_status(tmp_path, demo_image, controllers,
                                                                          stop_everything_after, cli):
    spec = write_spec(tmp_path, demo_image)
    stop_everything_after(spec)
    c = controllers(spec, tmp_path / "controller.log")
    c.wait_log("acquired with token")
    r = cli("--spec", str(spec), "scale", "sage=1")
    assert r.returncode == 0, r.stderr
    assert "holds the lease and acts on them" in r.stdout, r.stdout
    c.wait_log("sage: submitting 1: desired 1, have 0")
    first = wait_for(lambda: healthy_one(c), 120, "one healthy sage")

    # The status page, the JSON and the metrics agree.
    r = cli("--spec", str(spec), "status")
    assert r.returncode == 0 and "controller: controller " in r.stdout and "HEALTHY" in r.stdout, r.stdout
    ctype, text = c.get("/metrics")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    figures = {(s.labels["role"], s.labels["figure"]): s.value for s in families["salvus_role_jobs"].samples}
    assert figures[("sage", "desired")] == 1 and figures[("sage", "healthy")] == 1
    assert families["salvus_controller_leader"].samples[0].value == 1
    assert "salvus_boot_to_registered_seconds" in families and "salvus_queue_wait_seconds" in families
    ctype, html = c.get("/")
    assert ctype.startswith("text/html") and 'data-role="sage"' in html and "http-equiv=\"refresh\"" in html

    # A dead VM (its QEMU killed): back to one healthy service, never two VMs.
    os.kill(qemu_of(wrapper_of(spec, first["job_id"])), signal.SIGKILL)
    wait_for(lambda: not healthy_one(c), 60, "the controller notices the dead VM", interval=0.1)
    second = wait_for(lambda: healthy_one(c), 120, "a healthy sage after the kill")
    assert len(qemu_pids(spec)) == 1 and len(registered(spec)) == 1

    # A hung guest (QEMU stopped: the wrapper still heartbeats): unhealthy, replaced.
    hung = qemu_of(wrapper_of(spec, second["job_id"]))
    os.kill(hung, signal.SIGSTOP)
    try:
        c.wait_log(f"unhealthy: {second['service_id']} failed 2 probes in a row")
        third = wait_for(lambda: healthy_one(c, exclude={second["service_id"]}), 120, "a replacement for the hung guest")
        assert third["job_id"] != second["job_id"]
        wait_for(lambda: not pid_alive(hung), 60, "the hung VM is gone")
    finally:
        if pid_alive(hung):
            os.kill(hung, signal.SIGCONT)
    assert [s.service_id for s in registered(spec)] == [third["service_id"]]
    assert len(qemu_pids(spec)) == 1
    events = c.text()
    for kind in ("submit:", "unhealthy:", "replace:", "submitted:"):
        assert kind in events, events
    assert any(e["kind"] == "unhealthy" for e in c.status()["events"])

    r = cli("--spec", str(spec), "stop", "--all", timeout=120)
    assert r.returncode == 0, r.stderr
    assert registered(spec) == [] and qemu_pids(spec) == []


def test_killed_supervisor_leaves_one_vm_and_stop_all_reaps_it(tmp_path, demo_image, controllers,
                                                               stop_everything_after, cli):
    spec = write_spec(tmp_path, demo_image)
    stop_everything_after(spec)
    r = cli("--spec", str(spec), "scale", "sage=1")
    assert r.returncode == 0 and "submit 1" in r.stdout, r.stdout + r.stderr
    wait_for(lambda: registered(spec), 120, "sage registered")
    backend = open_backend(load_spec(spec))
    (job,) = backend.list("sage")
    supervisor = json.loads((load_spec(spec).store_path / "state" / "local-jobs" / f"{job.job_id}.json").read_text())["pid"]
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: not pid_alive(supervisor), 10, "the supervisor is gone")

    # Its VM heartbeats on: a one-shot scale counts it, never starts a duplicate.
    r = cli("--spec", str(spec), "scale", "sage=1")
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout + r.stderr
    assert len(qemu_pids(spec)) == 1

    # The controller's reaper stops the orphan and a replacement takes its place: one VM, one service.
    c = controllers(spec, tmp_path / "controller.log")
    c.wait_log(f"reaped: reaped sage job {job.job_id}")
    new = wait_for(lambda: healthy_one(c, exclude={job.service_id}), 120, "a replacement for the orphan")
    wait_for(lambda: len(qemu_pids(spec)) == 1, 60, "the orphan's VM is gone")
    assert [s.service_id for s in registered(spec)] == [new["service_id"]]
    c.stop()

    # Orphaned again, then `stop --all` with no controller: nothing left.
    new_sup = json.loads((load_spec(spec).store_path / "state" / "local-jobs" / f"{new['job_id']}.json").read_text())["pid"]
    os.kill(new_sup, signal.SIGKILL)
    wait_for(lambda: not pid_alive(new_sup), 10, "the second supervisor is gone")
    r = cli("--spec", str(spec), "stop", "--all", timeout=120)
    assert r.returncode == 0, r.stderr
    assert registered(spec) == [] and qemu_pids(spec) == []


def test_one_controller_acts_a_paused_leader_is_fenced_and_the_standby_takes_over(tmp_path, demo_image, controllers,
                                                                                   stop_everything_after, cli):
    spec_a = write_spec(tmp_path, demo_image, "a.yaml")
    spec_b = write_spec(tmp_path, demo_image, "b.yaml")  # the same site, store and registry; its own port
    stop_everything_after(spec_a)
    a = controllers(spec_a, tmp_path / "a.log")
    a.wait_log("acquired with token")
    b = controllers(spec_b, tmp_path / "b.log")
    b.wait_log("standby: lease held by controller ")
    assert cli("--spec", str(spec_a), "scale", "sage=1").returncode == 0
    wait_for(lambda: healthy_one(a), 120, "one healthy sage")
    assert "submitted:" not in b.text()
    assert len(open_backend(load_spec(spec_a)).list("sage")) == 1

    # Pause the leader past its lease: the standby takes over and acts on a new count...
    os.kill(a.proc.pid, signal.SIGSTOP)
    paused = time.monotonic()
    b.wait_log("acquired with token", timeout=30)
    took_over = time.monotonic() - paused
    assert cli("--spec", str(spec_b), "scale", "sage=2").returncode == 0
    b.wait_log("submitted:")
    wait_for(lambda: len(registered(spec_a)) == 2, 120, "two sages")
    # ...and the resumed leader does nothing: its token is stale.
    resumed_at = len(a.text())
    os.kill(a.proc.pid, signal.SIGCONT)
    a.wait_log("lease: lost", after=resumed_at)
    a.wait_log("standby: lease held by controller ", after=resumed_at)
    after = a.text()[resumed_at:]
    assert "submitted:" not in after and "cancel:" not in after and "unhealthy:" not in after, after
    assert len(open_backend(load_spec(spec_a)).list("sage")) == 2 and len(qemu_pids(spec_a)) == 2
    assert took_over < load_spec(spec_a).controller.lease + 10

    # The leader killed outright: the standby takes over.
    at = len(a.text())
    b.proc.kill()
    b.proc.wait()
    a.wait_log("acquired with token", after=at, timeout=30)
    wait_for(lambda: a.status()["role"] == "leader", 30, "the status says leader")
    r = cli("--spec", str(spec_a), "stop", "--all", timeout=120)
    assert r.returncode == 0, r.stderr
    assert registered(spec_a) == [] and qemu_pids(spec_a) == []


@pytest.mark.slurm
def test_controller_on_slurm_replaces_a_hung_guest(tmp_path, demo_image, controllers, stop_everything_after,
                                                  slurm_cluster, cli):
    spec = scheduler_spec(tmp_path, demo_image, "slurm")
    with open(spec, "a") as f:
        f.write(f"controller: {{interval: 1, lease: 4, listen: '127.0.0.1:{free_port()}', unhealthy_after: 2, "
                "probe_timeout: 1}\n")
    stop_everything_after(spec)
    c = controllers(spec, tmp_path / "controller.log")
    c.wait_log("acquired with token")
    assert cli("--spec", str(spec), "scale", "sage=1").returncode == 0
    first = wait_for(lambda: healthy_one(c), 240, "one healthy sage on Slurm")
    (hung,) = qemu_pids(spec)
    os.kill(hung, signal.SIGSTOP)
    try:
        c.wait_log(f"unhealthy: {first['service_id']} failed 2 probes in a row")
        second = wait_for(lambda: healthy_one(c, exclude={first["service_id"]}), 240, "a replacement on Slurm")
        wait_for(lambda: not pid_alive(hung), KILL_WAIT + 60, "the hung VM is gone")
    finally:
        if pid_alive(hung):
            os.kill(hung, signal.SIGCONT)
    assert second["job_id"] != first["job_id"]
    assert [s.service_id for s in registered(spec)] == [second["service_id"]] and len(qemu_pids(spec)) == 1
    r = cli("--spec", str(spec), "stop", "--all", timeout=150)
    assert r.returncode == 0, r.stderr
    assert registered(spec) == [] and qemu_pids(spec) == []
