"""Walltime succession and rolling upgrades with real demo VMs and a real `salvus_jobs controller`:
sampled every second, the number of healthy registered services never drops below the role's
count; predecessors end by a drain after their successor was healthy, not by the walltime kill;
a broken version halts its rollout with the old VMs serving."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.errors import RegistryUnavailable
from cluster.registry import open_registry
from cluster.spec import load_spec
from jobwrappers.probe import probe_once
from tests.fixtures.demo_image import demo_spec_text
from tests.polling import wait_for
from tests.submit_support import stop_everything_after  # noqa: F401 (fixture)
from tests.test_controller import ControllerProc, controllers, free_port  # noqa: F401 (fixture)

pytestmark = [pytest.mark.vm, pytest.mark.slow]  # soaks: minutes of VMs

SALVUS_JOBS = str(Path(sys.executable).parent / "salvus_jobs")


class HealthySampler:
    """Counts, every second, the role's registered services that answer their probe (asked here,
    not by the controller); `low` is the minimum seen since `arm()`."""

    def __init__(self, spec_path: Path, role: str = "sage") -> None:
        self.spec = load_spec(spec_path)
        self.role = role
        self.low: int | None = None
        self.samples: list[tuple[float, int, list[str]]] = []
        self.armed = False
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def healthy_now(self) -> tuple[int, list[str]]:
        with open_registry(self.spec) as reg:
            rows = reg.lookup(self.role)
        probe = self.spec.roles[self.role].probe
        ok = []
        for s in rows:
            try:
                probe_once(s.host, s.port, probe)
                ok.append(f"{s.service_id}:{s.image}")
            except OSError:
                pass
        return len(ok), ok

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                n, which = self.healthy_now()
            except RegistryUnavailable as e:  # the registry busy for a moment: no sample, not zero
                self.errors.append(str(e))
                self.stop.wait(1.0)
                continue
            if self.armed:
                self.samples.append((time.time(), n, which))
                self.low = n if self.low is None else min(self.low, n)
            self.stop.wait(1.0)

    def arm(self) -> None:
        self.armed = True

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)

    def below(self, count: int) -> list[tuple[float, int, list[str]]]:
        return [s for s in self.samples if s[1] < count]


def store_image_spec(tmp_path: Path, demo_image, *, scheduler: str = "{backend: local, max_retries: 1}",
                     sage: str = "", controller: str = "") -> Path:
    """The demo spec with sage booting catalogue-style images from the store (insecure mode):
    images/base/demo-1.qcow2 and demo-2.qcow2 are the demo guest, demo-3.qcow2 an empty disk (a
    version that never becomes healthy)."""
    store = tmp_path / "store"
    base = store / "images" / "base"
    base.mkdir(parents=True)
    for v in ("1", "2"):
        shutil.copyfile(demo_image.disk, base / f"demo-{v}.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base / "demo-3.qcow2"), "64M"], check=True)
    text = demo_spec_text(demo_image, store).replace(f"image_path: {demo_image.disk}\n    boot:", "boot:", 1)
    text = text.replace("    port: 6000\n", f"    port: 6000\n    count: 2\n    drain_seconds: 2\n"
                                          f"    boot_timeout: 30\n{sage}", 1)
    path = tmp_path / "cluster.yaml"
    path.write_text(f"site: suc{tmp_path.name[-6:].replace('_', '')}\nscheduler: {scheduler}\n"
                    f"controller: {{interval: 1, lease: 4, listen: '127.0.0.1:{free_port()}', unhealthy_after: 2, "
                    f"probe_timeout: 1, cancel_after: 2{controller}}}\n" + text)
    return path


def cli(spec: Path, *args: str) -> str:
    r = subprocess.run([SALVUS_JOBS, "--spec", str(spec), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def sage_images(spec: Path) -> list[str]:
    with open_registry(load_spec(spec)) as reg:
        return sorted(s.image for s in reg.lookup("sage"))


def test_rolling_upgrade_keeps_the_count_and_a_broken_version_halts_with_the_old_ones_serving(
        tmp_path, demo_image, controllers, stop_everything_after):
    spec = store_image_spec(tmp_path, demo_image)
    stop_everything_after(spec)
    c: ControllerProc = controllers(spec, tmp_path / "controller.log")
    sampler = HealthySampler(spec)
    try:
        wait_for(lambda: sampler.healthy_now()[0] == 2, 120, "two demo@1 sage services healthy")
        assert sage_images(spec) == ["demo@1", "demo@1"]
        sampler.arm()
        out = cli(spec, "upgrade", "sage", "--image", "demo@2")
        assert "recorded the rollout demo@1 -> demo@2" in out and "holds the lease" in out
        wait_for(lambda: sage_images(spec) == ["demo@2", "demo@2"]
                 and (c.status()["roles"]["sage"].get("rollout") or {}).get("state") == "done",
                 180, "every sage on demo@2")
        assert c.text().count("upgrade: sage job") == 2  # one at a time, each logged with its reason
        at = c.wait_log("rollout-done: sage: every job boots demo@2")

        cli(spec, "upgrade", "sage", "--image", "demo@3")
        c.wait_log("rollout-halted: sage: demo@3 failed 2 times", timeout=240, after=at)
        rollout = c.status()["roles"]["sage"]["rollout"]
        assert rollout["state"] == "halted" and rollout["failures"] == 2, rollout
        assert "halted" in cli(spec, "upgrade", "sage")
        # The old ones kept serving throughout, and nothing more of demo@3 is started.
        time.sleep(5)
        assert sage_images(spec) == ["demo@2", "demo@2"]
        status = c.status()
        live = [j for j in status["jobs"] if j["state"] in ("queued", "running")]
        assert sorted(j["image"] for j in live) == ["demo@2", "demo@2"], live
        assert "demo@1 -> demo@2" in "\n".join(c.text().splitlines())  # the rollout's own line
        back = cli(spec, "upgrade", "sage", "--rollback")
        assert "demo@3 -> demo@2" in back
    finally:
        sampler.close()
    assert sampler.low == 2 and not sampler.below(2), sampler.below(2)[:5]


def soak(c: ControllerProc, sampler: HealthySampler, spec: Path, seconds: float, successions: int) -> None:
    """Runs the role for `seconds` (at least until `successions` predecessors were drained), the
    sampler armed once the count is first reached."""
    wait_for(lambda: sampler.healthy_now()[0] == 2, 240, "two sage services healthy")
    sampler.arm()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or c.text().count("drained: sage job") < successions:
        assert time.monotonic() < deadline + 180, f"fewer than {successions} drains:\n{c.text()[-4000:]}"
        assert c.proc.poll() is None, c.text()[-4000:]
        time.sleep(1)


def walltime_soak(tmp_path, demo_image, controllers, stop_everything_after, scheduler: str, seconds: float,
                  successions: int, lead_floor: int = 15) -> ControllerProc:
    """Count 2 for `seconds` under `scheduler`'s walltime: never fewer than 2 healthy services,
    no job ended before it was drained, and every drained predecessor ended by the drain's stop
    (not by its walltime: the local executor's SIGTERM at the limit, Slurm's TIMEOUT or early
    signal). Returns the controller, for more checks."""
    spec = store_image_spec(tmp_path, demo_image, scheduler=scheduler, sage="    stop_timeout: 5\n",
                            controller=f", lead_floor: {lead_floor}")
    stop_everything_after(spec)
    c = controllers(spec, tmp_path / "controller.log")
    sampler = HealthySampler(spec)
    try:
        soak(c, sampler, spec, seconds, successions=successions)
    finally:
        sampler.close()
    log = c.text()
    assert sampler.low == 2 and not sampler.below(2), sampler.below(2)[:5]
    assert "walltime: sage job" not in log, log  # no job ended before it was drained
    drained = [line for line in log.splitlines() if "drained: sage job" in line]
    assert len(drained) >= successions and all(line.endswith("(ended by cancel)") for line in drained), drained
    return c


def test_local_walltime_succession_never_dips_below_the_count(tmp_path, demo_image, controllers,
                                                             stop_everything_after):
    # A lead of 30 s of the 60: a successor's boot took over 20 s while the other worker started three
    # Cassandra nodes, and the predecessors reached their walltime first.
    c = walltime_soak(tmp_path, demo_image, controllers, stop_everything_after,
                      "{backend: local, max_retries: 1, walltime: '01:00'}", 75, successions=3, lead_floor=30)
    assert c.status()["roles"]["sage"]["lead_s"] >= 30 + 2 + 2


@pytest.mark.slurm
def test_slurm_walltime_succession_never_dips_below_the_count(tmp_path, demo_image, controllers,
                                                             stop_everything_after, slurm_cluster):
    # Slurm: the job asks for --signal=B:TERM@(grace + 60) and may get it 60 s earlier still, so a
    # 3-minute job with stop_timeout 5 (grace 20) can be signalled 40 s after it starts.
    walltime_soak(tmp_path, demo_image, controllers, stop_everything_after,
                  "{backend: slurm, walltime: '3', require_image: false}", 60, successions=2)


def test_a_persistent_role_hands_its_disk_to_its_successor_and_the_gap_is_reported(
        tmp_path, demo_image, controllers, stop_everything_after):
    spec = tmp_path / "cluster.yaml"
    text = demo_spec_text(demo_image, tmp_path / "store").replace(
        "    port: 9042\n", "    port: 9042\n    count: 1\n    drain_seconds: 1\n    stop_timeout: 5\n", 1)
    spec.write_text(f"site: hand{tmp_path.name[-6:].replace('_', '')}\n"
                    "scheduler: {backend: local, max_retries: 1, walltime: '00:50'}\n"
                    f"controller: {{interval: 1, lease: 4, listen: '127.0.0.1:{free_port()}', unhealthy_after: 2, "
                    "probe_timeout: 1, lead_floor: 10}\n" + text)
    stop_everything_after(spec)
    c = controllers(spec, tmp_path / "controller.log")
    sampler = HealthySampler(spec, role="cassandra")
    try:
        wait_for(lambda: sampler.healthy_now()[0] == 1, 240, "cassandra-0 healthy")
        first = sampler.healthy_now()[1]
        c.wait_log("successor job", timeout=120)
        at = c.wait_log("handover: cassandra: cassandra-0 serves again from job", timeout=120)
        gap = float(c.text()[at:].split(",")[1].split("s after")[0])
        status = c.status()["roles"]["cassandra"]
        assert status["handover_gap_s"] == pytest.approx(gap, abs=0.2)
    finally:
        sampler.close()
    log = c.text()
    assert "walltime: cassandra job" not in log, log
    with open_registry(load_spec(spec)) as reg:
        (row,) = reg.lookup("cassandra")
    assert row.service_id == "cassandra-0" and first
    # The successor found the predecessor's data: the demo guest counts its boots on the disk.
    with socket.create_connection((row.host, row.port), timeout=5) as s:
        assert b"boots=2" in s.recv(200)
    assert 0 < gap < 60


@pytest.mark.slurm
def test_a_job_queued_before_the_image_changed_boots_the_old_version(tmp_path, demo_image, stop_everything_after,
                                                                     slurm_cluster):
    spec = store_image_spec(tmp_path, demo_image, scheduler="{backend: slurm, require_image: false}")
    spec.write_text(spec.read_text().replace("    count: 2\n", "    count: 0\n", 1))
    stop_everything_after(spec)
    down = ("scontrol", "update", f"PartitionName={slurm_cluster.partition}")
    assert slurm_cluster.run(*down, "State=DOWN").returncode == 0
    try:
        cli(spec, "scale", "sage=1")  # queued: the partition takes no jobs
        spec.write_text(spec.read_text().replace("image: demo@1\n    boot:", "image: demo@2\n    boot:", 1))
        assert load_spec(spec).roles["sage"].image == "demo@2"
    finally:
        assert slurm_cluster.run(*down, "State=UP").returncode == 0
    wait_for(lambda: sage_images(spec) == ["demo@1"], 180, "the queued job registered")
    cli(spec, "scale", "sage=2")  # a job submitted now boots the spec's new image
    wait_for(lambda: sage_images(spec) == ["demo@1", "demo@2"], 180, "the new job registered")
