"""The local executor and `scale`/`status`/`stop` on it, with real VMs booted by `salvus-vmjob`."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cluster.registry import open_registry
from cluster.spec import load_spec
from submit import open_backend
from tests.fixtures.demo_image import demo_spec_text, pid_alive
from tests.submit_support import stop_everything_after  # noqa: F401 (fixture)


def write_spec(tmp_path: Path, demo_image, backend: str = "local", site: str = "loc", extra: str = "") -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(f"site: {site}\nscheduler: {{backend: {backend}{extra}}}\n"
                    + demo_spec_text(demo_image, tmp_path / "store"))
    return path


def status(cli, spec: Path) -> dict:
    r = cli("--spec", str(spec), "status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_registered(spec_path: Path, role: str, n: int, timeout: float = 240) -> list:
    spec = load_spec(spec_path)
    deadline = time.monotonic() + timeout
    with open_registry(spec) as reg:
        while time.monotonic() < deadline:
            live = reg.lookup(role)
            if len(live) >= n:
                return live
            time.sleep(0.5)
    logs = "\n".join(p.read_text()[-1500:] for p in (spec.store_path / "logs").glob("*.err"))
    raise AssertionError(f"{n} {role} not registered within {timeout}s:\n{logs}")


@pytest.mark.vm
def test_local_scale_up_same_down_then_stop_with_real_vms(tmp_path, demo_image, stop_everything_after, cli):
    spec = write_spec(tmp_path, demo_image)
    stop_everything_after(spec)
    r = cli("--spec", str(spec), "scale", "sage=2")
    assert r.returncode == 0, r.stderr
    assert "submit 2" in r.stdout
    live = wait_registered(spec, "sage", 2)
    st = status(cli, spec)
    assert st["roles"]["sage"] == {"desired": 2, "queued": 0, "running": 2, "held": 0, "stopping": 0,
                                   "failed": 0, "registered": 2}
    endpoints = {s.endpoint for s in live}
    assert {j["endpoint"] for j in st["jobs"]} == endpoints  # the status shows where each answers
    assert all(j["registered"] and j["age"] >= 0 for j in st["jobs"])

    # The same count again: nothing submitted, nothing cancelled (the CLI that started them is gone).
    r = cli("--spec", str(spec), "scale", "sage=2")
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout + r.stderr
    assert len(open_backend(load_spec(spec)).list("sage")) == 2

    # Down to one: the newest job goes; its guest shuts down and deregisters.
    jobs = sorted(st["jobs"], key=lambda j: j["submitted"])
    r = cli("--spec", str(spec), "scale", "sage=1")
    assert r.returncode == 0, r.stderr
    assert f"cancel 1 ({jobs[-1]['job_id']}:running)" in r.stdout
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with open_registry(load_spec(spec)) as reg:
            ids = {s.service_id for s in reg.lookup("sage")}
        if ids == {jobs[0]["service_id"]}:
            break
        time.sleep(0.5)
    assert ids == {jobs[0]["service_id"]}
    err = (tmp_path / "store" / "logs" / f"{jobs[-1]['job_id']}.err").read_text()
    assert "guest shut down" in err  # ACPI shutdown, not a kill

    r = cli("--spec", str(spec), "stop", "--all", timeout=120)
    assert r.returncode == 0, r.stderr
    with open_registry(load_spec(spec)) as reg:
        assert reg.all() == []
    for rec in (tmp_path / "store" / "state" / "local-jobs").glob("*.json"):
        assert not pid_alive(json.loads(rec.read_text())["pid"])
    assert status(cli, spec)["jobs"] == []


def test_local_job_with_missing_image_is_held_with_reason_not_replaced(tmp_path, demo_image, stop_everything_after, cli):
    spec = write_spec(tmp_path, demo_image)
    stop_everything_after(spec)
    text = spec.read_text().replace(f"image_path: {demo_image.disk}", f"image_path: {tmp_path}/missing.qcow2", 1)
    spec.write_text(text)
    r = cli("--spec", str(spec), "scale", "sage=1")
    assert r.returncode == 0, r.stderr
    backend = open_backend(load_spec(spec))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and backend.list("sage")[0].state != "held":
        time.sleep(0.3)
    job = backend.list("sage")[0]
    assert job.state == "held"
    assert job.hold_reason.startswith("salvus-vmjob exited 65")
    r = cli("--spec", str(spec), "scale", "sage=1")
    assert "nothing to do" in r.stdout and f"held {job.job_id}" in r.stdout, r.stdout
    assert len(backend.list("sage")) == 1
    r = cli("--spec", str(spec), "stop", "sage")
    assert r.returncode == 0 and backend.list() == []


def test_scale_dry_run_changes_nothing(tmp_path, demo_image, cli):
    spec = write_spec(tmp_path, demo_image)
    r = cli("--spec", str(spec), "scale", "sage=3", "hub=1", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "sage: desired 3, have 0" in r.stdout and "submit 3" in r.stdout and "dry run" in r.stdout
    assert open_backend(load_spec(spec)).list() == []
    assert not (tmp_path / "store" / "state" / "desired.json").exists()


@pytest.mark.parametrize("args, message", [
    (["scale", "sage"], "scale: expected ROLE=N with N a whole number, got 'sage'"),
    (["scale", "sage=-1"], "scale: expected ROLE=N with N a whole number, got 'sage=-1'"),
    (["scale", "nosuch=1"], "roles.nosuch: no such role"),
    (["render", "sage", "--scheduler", "lsf"], "unknown scheduler 'lsf' (expected one of: local, slurm, pbs, condor, drmaa)"),
    (["stop"], "stop: name the roles to stop, or --all"),
])
def test_bad_operator_input_is_one_line(tmp_path, demo_image, cli, args, message):
    spec = write_spec(tmp_path, demo_image)
    r = cli("--spec", str(spec), *args)
    assert r.returncode == 78
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert open_backend(load_spec(spec)).list() == []


def test_missing_wrapper_is_one_line_and_nothing_started(tmp_path, demo_image, cli):
    spec = write_spec(tmp_path, demo_image, extra=", wrapper: /nonexistent/salvus-vmjob")
    r = cli("--spec", str(spec), "scale", "sage=1")
    assert r.returncode == 78
    assert r.stderr == "salvus_jobs: scheduler.wrapper: /nonexistent/salvus-vmjob: not an executable file\n"
    assert open_backend(load_spec(spec)).list() == []
