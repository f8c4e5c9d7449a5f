"""Hosts marked unfit for site jobs (cluster/unfit.py), in process: forged rows are ignored, a
submitted Slurm job excludes the marked hosts (but not the host a persistent role is pinned to),
HTCondor requires another machine, and `status` lists the marks. The wrapper's side (a host
without the bridge marks itself, `network up` clears it) is in test_site_network_parts.py and
test_site_network.py."""
from __future__ import annotations

import json
import time

import pytest

from cluster import unfit
from cluster.registry import open_registry
from cluster.spec import load_spec, parse_spec
from submit import open_backend
from submit.cli import status_lines
from submit.runner import CommandResult
from submit.scale import status_report
from tests.polling import wait_for
from tests.test_render import FakeRunner

SITE = """
site: uf
store: '{store}'
scheduler: {{wrapper: /opt/salvus/bin/salvus-vmjob}}
hypervisor: {{hosts: [{{name: h1, address: 192.0.2.1, vm_range: 10.9.1.0/24}},
                      {{name: h2, address: 192.0.2.2, vm_range: 10.9.2.0/24}},
                      {{name: h3, address: 192.0.2.3, vm_range: 10.9.3.0/24}}]}}
site_network: {{subnet: 10.9.0.0/16}}
roles:
  sage: {{image: sage@1, port: 6000, network: site}}
  web: {{image: web@1, port: 8080}}
  cassandra: {{image: cassandra@4, port: 9042, network: site, hosts: [h2, h3],
              persistent: [{{name: data, size_mb: 64, mount: /data}}]}}
"""


def site_spec(tmp_path):
    return parse_spec(SITE.format(store=tmp_path / "store"), tmp_path / "cluster.yaml")


def sbatch_scripts(spec, role: str, n: int = 1) -> list[str]:
    runner = FakeRunner({"sbatch": CommandResult(["sbatch"], 0, "4242\n", ""),
                         "squeue": CommandResult(["squeue"], 0, "", "")})
    open_backend(spec, "slurm", runner).submit(role, n)
    return [script for argv, script, _ in runner.calls if argv[0] == "sbatch"]


def test_forged_rows_are_ignored(tmp_path):
    spec = site_spec(tmp_path)
    good = json.dumps({"reason": "no bridge", "since": 1e9})
    rows = {"h1": good, "h9": good, "h2,h3": good, "h3\n#SBATCH --x": good,
            "h2": json.dumps({"reason": "x" * 301, "since": 1e9}),
            "h3": json.dumps({"reason": "r", "since": "yesterday"})}
    assert unfit.parse(spec, rows) == [unfit.UnfitHost("h1", "no bridge", 1e9)]
    assert unfit.parse(spec, {"h1": "{not json"}) == []
    assert unfit.parse(spec, {"h1": json.dumps({"reason": "r", "since": float("nan")})}) == []


def test_a_submitted_slurm_job_excludes_the_marked_hosts(tmp_path):
    spec = site_spec(tmp_path)
    assert not any("--exclude" in s for s in sbatch_scripts(spec, "sage"))
    with open_registry(spec) as registry:
        unfit.mark(registry, "h2", "h2: no site network bridge salvusbr0")
        unfit.mark(registry, "h1", "h1: no site network bridge salvusbr0")
        registry.write_state(unfit.KIND, "h7", json.dumps({"reason": "forged", "since": 0}))
    assert "#SBATCH --exclude=h1,h2\n" in sbatch_scripts(spec, "sage")[0]
    # A user-network role does not need the site bridge; a persistent role's job must go where its
    # disk is (cassandra-0 on h2), so only the other marked host is excluded for it.
    assert not any("--exclude" in s for s in sbatch_scripts(spec, "web"))
    cas = sbatch_scripts(spec, "cassandra", 2)
    assert "#SBATCH --nodelist=h2\n" in cas[0] and "#SBATCH --exclude=h1\n" in cas[0]
    assert "#SBATCH --nodelist=h3\n" in cas[1] and "#SBATCH --exclude=h1,h2\n" in cas[1]
    with open_registry(spec) as registry:
        assert unfit.clear(registry, "h1") and unfit.clear(registry, "h2") and not unfit.clear(registry, "h2")
    assert not any("--exclude" in s for s in sbatch_scripts(spec, "sage"))


def test_htcondor_requires_a_machine_not_marked(tmp_path):
    backend = open_backend(site_spec(tmp_path), "condor")
    backend.unfit_hosts = ["h1", "h2"]  # what prepare_submit reads from the registry
    assert backend.requirements("sage", None).split(" && ")[1:] == ['TARGET.Machine != "h1"', 'TARGET.Machine != "h2"']
    assert "Machine" not in backend.requirements("web", None)


def test_grid_engine_asks_for_a_host_not_marked(tmp_path):
    backend = open_backend(site_spec(tmp_path), "drmaa")
    backend.unfit_hosts = ["h1", "h3"]
    assert backend.native_spec("sage", None) == "-r y -l h=!(h1|h3) -w w"
    # The persistent role's job runs where its disk is, whatever else is marked.
    assert backend.native_spec("cassandra", "cassandra-0").endswith("-l h=h2")
    assert "h=" not in backend.native_spec("web", None)


def test_status_lists_the_marked_hosts(tmp_path):
    spec = site_spec(tmp_path)
    with open_registry(spec) as registry:
        unfit.mark(registry, "h3", "h3: no site network bridge salvusbr0", now=1e9)
    assert status_report(spec)["unfit_hosts"] == [{"host": "h3", "reason": "h3: no site network bridge salvusbr0",
                                                    "since": 1e9}]
    report = {"backend": "slurm", "roles": {}, "jobs": [],
              "unfit_hosts": [{"host": "h2", "reason": "h2: no bridge\x1b]0;x", "since": 0.0}]}
    lines = status_lines(report)
    assert lines[-3].startswith("hosts marked unfit")
    assert lines[-1].split()[0] == "h2" and lines[-1].endswith("h2: no bridge\\x1b]0;x")
    assert not any("unfit" in line for line in status_lines({**report, "unfit_hosts": []}))


def controller_spec(tmp_path, host: str, scheduler: str):
    """The site with `host` (a real scheduler's one node) as h1, for a controller."""
    text = SITE.format(store=tmp_path / "store").replace("name: h1,", f"name: {host},").replace(
        "scheduler: {wrapper: /opt/salvus/bin/salvus-vmjob}",
        f"{scheduler}\ncontroller: {{interval: 1, lease: 30, listen: '127.0.0.1:0'}}").replace(
        "site: uf", f"site: uf{tmp_path.name[-5:]}")
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return load_spec(path)


@pytest.mark.slurm
def test_queued_site_jobs_are_re_placed_when_a_host_is_marked_and_again_when_it_is_fixed(tmp_path, slurm_cluster):
    """A job the scheduler holds (here: its partition is down; in life a job requeued after a host
    without the bridge failed it) keeps the placement it was submitted with: the controller moves it
    off a host marked since, and allows the host again once it is fixed. Real Slurm."""
    from submit.controller import Controller
    from submit.scale import DESIRED

    node = slurm_cluster.node
    spec = controller_spec(tmp_path, node, "scheduler: {backend: slurm, wrapper: /bin/true, require_image: false}")
    down = ("scontrol", "update", f"PartitionName={slurm_cluster.partition}")
    assert slurm_cluster.run(*down, "State=DOWN").returncode == 0
    c = Controller(spec)
    try:
        c.registry.write_state(DESIRED, "sage", "1")
        c.cycle()
        (job,) = [j for j in c.backend.list("sage") if j.state == "queued"]

        def excluded() -> str:
            out = slurm_cluster.run("scontrol", "--oneliner", "show", "job", job.job_id).stdout
            return dict(f.split("=", 1) for f in out.split() if "=" in f).get("ExcNodeList", "")

        assert excluded() == "(null)"
        unfit.mark(c.registry, node, "no bridge salvus0")
        c.cycle()
        assert excluded() == node
        assert any(e["kind"] == "placement" and node in e["text"] for e in c.events)
        unfit.clear(c.registry, node)
        c.cycle()
        assert excluded() == "(null)"
    finally:
        assert slurm_cluster.run(*down, "State=UP").returncode == 0
        slurm_cluster.run("scancel", "--name", f"{spec.site}.sage")
        c.registry.close()


@pytest.mark.sge
def test_grid_engine_queued_site_jobs_avoid_a_marked_host_until_it_is_fixed(tmp_path, gridengine):
    """Real Son of Grid Engine (one execution host): a site job submitted while that host is
    marked asks for `h=!(HOST)` and stays pending; once the mark is lifted the controller's
    `qalter -l` lets it run there."""
    from submit.controller import Controller
    from submit.scale import DESIRED

    host = gridengine.host
    spec = controller_spec(tmp_path, host, "scheduler: {backend: drmaa, wrapper: /bin/true}")
    c = Controller(spec)
    try:
        unfit.mark(c.registry, host, "no bridge salvusbr0")
        c.registry.write_state(DESIRED, "sage", "1")
        c.cycle()
        (job,) = c.backend.list("sage")

        def hard_list() -> str:
            out = gridengine.run("qstat", "-j", job.job_id).stdout
            return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("hard resource_list")), "")

        assert hard_list() == f"hostname=!({host})"
        time.sleep(4)  # four scheduling runs: the only host is excluded, so it stays pending
        assert [j.state for j in c.backend.list("sage")] == ["queued"]
        unfit.clear(c.registry, host)
        c.cycle()
        assert hard_list() == "hostname=*"
        assert any(e["kind"] == "placement" and "no host" in e["text"] for e in c.events)
        # It runs (the wrapper here is /bin/true: it runs and is done).
        wait_for(lambda: job.job_id not in {j.job_id for j in c.backend.list("sage") if j.state == "queued"}, 60,
                 "the job to leave the queue once its host is allowed again")
    finally:
        gridengine.run("qdel", "-u", "*", check=False)
        c.registry.close()
