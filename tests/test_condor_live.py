"""HTCondor for real: the session's pool (tests/fixtures/condor.py: a central manager with the schedd
and two execute nodes, `node-a` and `node-b`, HTCondor 23.9 in a Debian 13 root) runs the demo
guest through the shipped submit files, `salvus_jobs scale` and every path a job can take: remove,
vacate, hold and release, a retried transient exit, held configuration and image failures, a job
removed behind our back, the walltime, and another user's look-alike jobs.

The operator's commands (`salvus_jobs`, `condor_*`) run inside the root as the site's account
`salvus`, as on a site's submit machine; the test process reads the pool through the `htcondor2`
bindings with a token for `salvus`.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cluster.spec import load_spec
from submit import open_backend
from tests.fixtures.condor import JOB_MAX_VACATE_S, JOB_USER, NODES
from tests.fixtures.demo_image import demo_spec_text
from tests.polling import wait_for

pytestmark = [pytest.mark.condor, pytest.mark.vm]

EXAMPLES = Path(__file__).resolve().parent.parent / "submit" / "examples"
_sites = iter(range(1, 10_000))


@pytest.fixture(scope="module")
def condor_image(condor_pool, demo_image):
    """The demo guest where the job user can read it (pytest's own directories are root's, 0700)."""
    d = condor_pool.workdir()
    for p in demo_image.paths():
        shutil.copy(p, d / p.name)
    subprocess.run(["chown", "-R", f"{JOB_USER}:{JOB_USER}", str(d)], check=True)
    yield type(demo_image)(*(d / p.name for p in demo_image.paths()))
    shutil.rmtree(d, ignore_errors=True)


class Site:
    """One test's site on the pool: its spec, store and registry under a directory `salvus` owns,
    and the operator's commands run as `salvus` inside the root."""

    def __init__(self, pool, image, extra: str = "") -> None:
        self.pool = pool
        self.dir = pool.workdir()
        self.name = f"c{next(_sites)}{self.dir.name[-5:].lower().replace('_', '')}"
        self.spec = self.dir / "cluster.yaml"
        scheduler = (f"{{backend: condor, schedd: {pool.schedd_name}, "
                     f"submit_user: {JOB_USER}, log_dir: {self.dir}/logs{extra}}}")
        self.spec.write_text(f"site: {self.name}\nscheduler: {scheduler}\n" +
                             demo_spec_text(image, self.dir / "store"))
        (self.dir / "logs").mkdir()
        subprocess.run(["chown", "-R", f"{JOB_USER}:{JOB_USER}", str(self.dir)], check=True)

    def salvus_jobs(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.pool.run("salvus_jobs", "--spec", str(self.spec), *args, user=JOB_USER, timeout=timeout)

    def status(self) -> dict:
        r = self.salvus_jobs("status", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def services(self, role: str = "sage") -> dict[str, dict]:
        r = self.salvus_jobs("services", "--json", role)
        assert r.returncode == 0, r.stderr
        return {s["service_id"]: s for s in json.loads(r.stdout)}

    def backend(self):
        return open_backend(load_spec(self.spec))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                         for p in sorted((self.dir / "logs").glob("*")) if p.is_file())

    def job_ad(self, job_id: str, *attrs: str) -> dict:
        import htcondor2

        schedd = htcondor2.Schedd(htcondor2.Collector(self.pool.collector).locate(htcondor2.DaemonType.Schedd, "cm"))
        cluster, proc = job_id.split(".")
        ads = schedd.query(constraint=f"ClusterId == {cluster} && ProcId == {proc}", projection=list(attrs))
        if not ads:
            ads = list(schedd.history(constraint=f"ClusterId == {cluster} && ProcId == {proc}",
                                      projection=list(attrs), match=1))
        return dict(ads[0]) if ads else {}

    def wait_registered(self, n: int, role: str = "sage", timeout: float = 180) -> dict[str, dict]:
        try:
            return wait_for(lambda: len(self.services(role)) == n and self.services(role), timeout,
                            f"{n} {role} registered")
        except AssertionError:
            raise AssertionError(self.logs() + self.pool.log("StartLog", "node-a")[-1500:]) from None

    def stop(self) -> None:
        self.salvus_jobs("stop", "--all", timeout=JOB_MAX_VACATE_S + 60)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def site(condor_pool, condor_image):
    made: list[Site] = []

    def make(extra: str = "") -> Site:
        made.append(Site(condor_pool, condor_image, extra))
        return made[-1]
    yield make
    for s in made:
        s.stop()


def test_scale_submits_through_the_bindings_boots_registers_and_scales_down_gracefully(site, condor_pool):
    s = site(", walltime: '10:00'")
    r = s.salvus_jobs("scale", "sage=2")
    assert r.returncode == 0, r.stderr
    services = s.wait_registered(2)
    jobs = {j.job_id: j for j in s.backend().list("sage")}
    assert len(jobs) == 2
    # Registered by the wrappers HTCondor started, under HTCondor's ClusterId.ProcId.
    assert {(v["scheduler"], v["job_id"]) for v in services.values()} == {("condor", j) for j in jobs}
    for job in jobs.values():
        assert job.state == "running" and job.image == "demo@1" and job.walltime_s == 600
        assert job.started and time.time() - 300 < job.started <= time.time()
        host = s.job_ad(job.job_id, "RemoteHost")["RemoteHost"]
        assert host.split("@")[1] in NODES
    st = s.status()
    assert st["roles"]["sage"]["running"] == 2 and st["roles"]["sage"]["registered"] == 2

    newest = max(jobs.values(), key=lambda j: int(j.job_id.split(".")[0]))
    t0 = time.monotonic()
    r = s.salvus_jobs("scale", "sage=1")
    assert f"cancel 1 ({newest.job_id}:running)" in r.stdout, r.stdout + r.stderr
    wait_for(lambda: newest.service_id not in s.services(), JOB_MAX_VACATE_S, "deregistered before SIGKILL")
    assert time.monotonic() - t0 < JOB_MAX_VACATE_S
    err = next((s.dir / "logs").glob(f"*.{newest.job_id}.err")).read_text()
    assert "SIGTERM: stopping the VM" in err and "guest shut down in" in err, err
    gone = wait_for(lambda: [j for j in s.backend().known_but_not_listed("sage", s.backend().list("sage"))
                             if j.job_id == newest.job_id], 60, "the removed job in the history")
    assert gone[0].state == "done" and gone[0].ended_by == "cancel"
