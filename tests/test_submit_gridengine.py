"""Son of Grid Engine through DRMAA (the `drmaa` package) with the real daemons the fixture starts:
submit, status, terminate with a graceful guest shutdown, a held job that is not replaced, and a
successor held (-hold_jid) until its predecessor ends."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cluster.registry import open_registry
from cluster.spec import load_spec
from submit import open_backend
from submit.base import Job
from tests.fixtures.gridengine import TERMINATE_GRACE
from tests.polling import wait_for
from tests.submit_support import scheduler_spec, stop_everything_after  # noqa: F401 (fixture)

pytestmark = pytest.mark.sge


def sge_spec(tmp_path: Path, demo_image, image_path: str | None = None) -> Path:
    return scheduler_spec(tmp_path, demo_image, "drmaa", image_path=image_path)


@pytest.mark.vm
def test_drmaa_submit_status_terminate_with_graceful_stop(tmp_path, demo_image, stop_everything_after, gridengine, cli):
    spec_path = sge_spec(tmp_path, demo_image)
    stop_everything_after(spec_path)
    spec = load_spec(spec_path)
    r = cli("--spec", str(spec_path), "scale", "sage=1")
    assert r.returncode == 0, r.stderr
    [job] = open_backend(spec).list("sage")

    def registered():
        with open_registry(spec) as reg:
            return reg.get(job.service_id)

    try:
        svc = wait_for(registered, 240, "the Grid Engine job's VM registered")
    except AssertionError:
        logs = "\n".join(p.read_text()[-1500:] for p in (spec.store_path / "logs").glob("*"))
        raise AssertionError(logs) from None
    assert svc.job_id == job.job_id  # the wrapper read Grid Engine's $JOB_ID
    st = json.loads(cli("--spec", str(spec_path), "status", "--json").stdout)
    assert st["backend"] == "drmaa"
    assert st["roles"]["sage"]["running"] == 1 and st["roles"]["sage"]["registered"] == 1
    assert st["jobs"][0]["endpoint"] == svc.endpoint

    t0 = time.monotonic()
    r = cli("--spec", str(spec_path), "stop", "sage", timeout=150)  # DRMAA TERMINATE, then waits
    assert r.returncode == 0, r.stderr
    took = time.monotonic() - t0
    assert registered() is None
    err = next((spec.store_path / "logs").glob(f"*.{job.job_id}.err")).read_text()
    # terminate_method sent SIGTERM; the guest shut down by ACPI before the SIGKILL deadline.
    assert "SIGTERM: stopping the VM" in err and "guest shut down in" in err, err
    assert took < TERMINATE_GRACE
    assert open_backend(spec).list("sage") == []


def test_drmaa_exit_65_job_is_held_and_not_replaced(tmp_path, demo_image, stop_everything_after, gridengine, cli):
    spec_path = sge_spec(tmp_path, demo_image, image_path=str(tmp_path / "missing.qcow2"))
    stop_everything_after(spec_path)
    assert cli("--spec", str(spec_path), "scale", "sage=1").returncode == 0
    backend = open_backend(load_spec(spec_path))
    job = wait_for(lambda: next((j for j in backend.list("sage") if j.state == "held"), None), 90,
               "exit 65 -> requeued on hold")
    assert "held after salvus-vmjob exit 65/78" in job.hold_reason
    r = cli("--spec", str(spec_path), "scale", "sage=1")
    assert "nothing to do" in r.stdout and f"held {job.job_id}" in r.stdout, r.stdout
    err = next((tmp_path / "store" / "logs").glob(f"*.{job.job_id}.err")).read_text()
    assert "salvus-vmjob exited 65" in err
    assert cli("--spec", str(spec_path), "stop", "sage", timeout=120).returncode == 0
    assert backend.list("sage") == []


def test_drmaa_unreachable_qmaster_is_one_line(tmp_path, demo_image, gridengine, cli):
    spec_path = sge_spec(tmp_path, demo_image)
    r = cli("--spec", str(spec_path), "scale", "sage=1", env={"SGE_QMASTER_PORT": "9"}, timeout=120)
    assert r.returncode == 75, r.stderr
    assert r.stderr.startswith("salvus_jobs: drmaa (submit): ") and r.stderr.count("\n") == 1, r.stderr
    assert open_backend(load_spec(spec_path)).ledger.jobs() == []


def test_drmaa_successor_is_held_by_grid_engine_until_its_predecessor_ends(tmp_path, demo_image, stop_everything_after,
                                                                           gridengine):
    # The predecessor is a held job submitted by hand (no VM): under test is that the successor
    # carries -hold_jid, lists as queued waiting for it, and is released once it has gone.
    spec = sge_spec(tmp_path, demo_image)
    stop_everything_after(spec)
    backend = open_backend(load_spec(spec))
    qsub = gridengine.run("qsub", "-terse", "-h", "-b", "y", "-o", "/dev/null", "-e", "/dev/null", "/bin/sleep", "600")
    held = qsub.stdout.strip()
    try:
        second = backend.submit_successor(Job(held, "sage", "running", "sage-0", time.time(), backend="drmaa"))
        assert second.service_id == "sage-0" and second.after == held
        [listed] = backend.list("sage")
        assert (listed.job_id, listed.state, listed.hold_reason) == (second.job_id, "queued",
                                                                     f"waiting for job {held} to end")
        assert "hqw" in gridengine.run("qstat").stdout
    finally:
        gridengine.run("qdel", held, check=False)
    # Released: Grid Engine no longer holds it (it is queued, or already running its wrapper).
    wait_for(lambda: backend.call({"op": "status", "ids": [second.job_id]})["states"][second.job_id]
             in ("queued_active", "running"), 60, "the successor released")
    backend.cancel(second)
