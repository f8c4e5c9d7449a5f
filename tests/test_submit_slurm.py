"""Slurm and PBS (through Slurm's qsub wrappers) with the real daemons the fixture starts, booting
real VMs; `scale` against the real queue; bad input from the scheduler's side."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.errors import SalvusError
from cluster.registry import open_registry
from cluster.spec import load_spec
from submit import open_backend
from submit.base import Job
from submit.slurm import parse_squeue
from tests.fixtures.slurm import KILL_WAIT
from tests.polling import wait_for
from tests.submit_support import scheduler_spec, standin_spec, stop_everything_after  # noqa: F401 (fixture)

pytestmark = pytest.mark.slurm
TORQUE_BIN = Path("/opt/salvus/slurm-torque/bin")


def slurm_spec(tmp_path: Path, demo_image, extra: str = "", image_path: str | None = None) -> Path:
    return scheduler_spec(tmp_path, demo_image, "slurm", extra, image_path)


def live(spec_path: Path, role: str) -> dict:
    with open_registry(load_spec(spec_path)) as reg:
        return {s.service_id: s for s in reg.lookup(role)}


def logs_of(spec_path: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}"
                     for p in sorted((load_spec(spec_path).store_path / "logs").glob("*")))


@pytest.mark.vm
def test_slurm_scale_boots_registered_vms_and_scale_down_stops_one_gracefully(tmp_path, demo_image, stop_everything_after, slurm_cluster, cli):
    spec = slurm_spec(tmp_path, demo_image)
    stop_everything_after(spec)
    r = cli("--spec", str(spec), "scale", "sage=2")
    assert r.returncode == 0, r.stderr
    jobs = open_backend(load_spec(spec)).list("sage")
    assert len(jobs) == 2
    try:
        services = wait_for(lambda: len(live(spec, "sage")) == 2 and live(spec, "sage"), 240, "2 sage registered")
    except AssertionError:
        raise AssertionError(logs_of(spec)) from None
    # Registered by the wrappers Slurm started, under Slurm's job ids.
    assert {(s.scheduler, s.job_id) for s in services.values()} == {("slurm", j.job_id) for j in jobs}
    st = json.loads(cli("--spec", str(spec), "status", "--json").stdout)
    assert st["roles"]["sage"]["running"] == 2 and st["roles"]["sage"]["registered"] == 2
    assert all(j["endpoint"] == services[j["service_id"]].endpoint for j in st["jobs"])

    assert "nothing to do" in cli("--spec", str(spec), "scale", "sage=2").stdout

    newest = max(jobs, key=lambda j: int(j.job_id))
    t0 = time.monotonic()
    r = cli("--spec", str(spec), "scale", "sage=1")
    assert f"cancel 1 ({newest.job_id}:running)" in r.stdout, r.stdout + r.stderr
    wait_for(lambda: newest.service_id not in live(spec, "sage"), KILL_WAIT, "deregistered before SIGKILL")
    gone_after = time.monotonic() - t0
    # The wrapper (exec'd by the batch script) got SIGTERM, shut the guest down by ACPI, deregistered
    # and exited by itself well before Slurm's KillWait would have sent SIGKILL.
    wait_for(lambda: slurm_cluster.run("squeue", "-h", "-t", "all", "-j", newest.job_id, "-o", "%T").stdout.strip()
             == "CANCELLED", KILL_WAIT, "job ended")
    assert gone_after < KILL_WAIT
    err = next((load_spec(spec).store_path / "logs").glob(f"*-{newest.job_id}.err")).read_text()
    assert "SIGTERM: stopping the VM" in err and "guest shut down in" in err, err
    assert set(live(spec, "sage")) == {j.service_id for j in jobs if j is not newest}

    r = cli("--spec", str(spec), "stop", "--all", timeout=150)
    assert r.returncode == 0, r.stderr
    assert live(spec, "sage") == {}


@pytest.mark.vm
def test_pbs_script_from_render_runs_through_qsub_and_boots_a_vm(tmp_path, demo_image, stop_everything_after, slurm_cluster, cli):
    spec = slurm_spec(tmp_path, demo_image, extra=f", bin_dir: {TORQUE_BIN}")
    stop_everything_after(spec)
    r = cli("--spec", str(spec), "render", "sage", "--scheduler", "pbs")
    assert r.returncode == 0, r.stderr
    script = tmp_path / "sage.pbs"
    script.write_text(r.stdout)
    assert "#PBS -l nodes=1:ppn=1" in r.stdout and "\nexec " in r.stdout
    out, err = tmp_path / "pbs.out", tmp_path / "pbs.err"
    q = subprocess.run([str(TORQUE_BIN / "qsub"), "-o", str(out), "-e", str(err), str(script)],
                       capture_output=True, text=True, timeout=60)
    assert q.returncode == 0, q.stdout + q.stderr
    job_id = q.stdout.strip()
    try:
        svc = wait_for(lambda: live(spec, "sage").get(f"sage-{job_id}"), 240, "the PBS job's VM registered")
    except AssertionError:
        raise AssertionError(err.read_text() if err.exists() else "no job output") from None
    assert (svc.scheduler, svc.job_id) == ("slurm", job_id)  # through the wrapper only SLURM_* is set
    # The pbs backend sees the hand-submitted job by its name, through qstat.
    pbs_jobs = open_backend(load_spec(spec), "pbs").list("sage")
    assert [(j.job_id, j.state, j.service_id) for j in pbs_jobs] == [(job_id, "running", f"sage-{job_id}")]
    subprocess.run([str(TORQUE_BIN / "qdel"), job_id], check=True, capture_output=True, timeout=60)
    wait_for(lambda: not live(spec, "sage"), KILL_WAIT, "deregistered after qdel")
    wait_for(lambda: "guest shut down in" in err.read_text(), 30, "graceful shutdown logged")


def test_slurm_held_job_is_reported_with_its_exit_code_and_not_replaced(tmp_path, demo_image, stop_everything_after, slurm_cluster, cli):
    spec = slurm_spec(tmp_path, demo_image, image_path=str(tmp_path / "missing.qcow2"))
    stop_everything_after(spec)
    assert cli("--spec", str(spec), "scale", "sage=1").returncode == 0
    backend = open_backend(load_spec(spec))
    job = wait_for(lambda: next((j for j in backend.list("sage") if j.state == "held"), None), 90,
                   "exit 65 -> requeued held")
    assert job.hold_reason.startswith("salvus-vmjob exited 65"), job.hold_reason
    r = cli("--spec", str(spec), "scale", "sage=1")
    assert "nothing to do" in r.stdout and f"held {job.job_id}" in r.stdout and "exited 65" in r.stdout, r.stdout
    assert [j.job_id for j in backend.list("sage")] == [job.job_id]
    st = json.loads(cli("--spec", str(spec), "status", "--json").stdout)
    assert st["roles"]["sage"]["held"] == 1 and "exited 65" in st["jobs"][0]["hold_reason"]
    assert cli("--spec", str(spec), "stop", "sage").returncode == 0
    assert [j for j in backend.list("sage") if j.state not in ("done", "failed")] == []


def test_slurm_scale_counts_jobs_gone_behind_our_back_and_never_submits_twice(tmp_path, demo_image, stop_everything_after, slurm_cluster, cli):
    # Jobs that cannot start for an hour: the queue holds them pending while we reconcile.
    spec = slurm_spec(tmp_path, demo_image, extra=', extra_directives: ["--begin=now+3600"]')
    stop_everything_after(spec)
    procs = [subprocess.Popen([str(Path(sys.executable).parent / "salvus_jobs"),
                               "--spec", str(spec), "scale", "hub=3"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    backend = open_backend(load_spec(spec))
    jobs = backend.list("hub")
    assert len(jobs) == 3 and {j.state for j in jobs} == {"queued"}  # two runs, one shortfall

    victim = jobs[0]
    slurm_cluster.run("scancel", victim.job_id)  # removed behind our back
    r = cli("--spec", str(spec), "scale", "hub=3", "--dry-run")
    assert f"gone {victim.job_id}" in r.stdout and "submit 1" in r.stdout, r.stdout
    r = cli("--spec", str(spec), "scale", "hub=3")
    assert "submitted slurm job" in r.stdout
    r = cli("--spec", str(spec), "scale", "hub=3")
    assert "nothing to do" in r.stdout and "gone" not in r.stdout, r.stdout
    assert len([j for j in backend.list("hub") if j.state == "queued"]) == 3
    assert cli("--spec", str(spec), "stop", "hub").returncode == 0


def test_malformed_squeue_output_is_one_clear_error():
    class Named:
        name = "slurm"

        @staticmethod
        def role_of(name):
            return "sage"

    with pytest.raises(SalvusError) as e:
        parse_squeue("12|x.sage|RUNNING|None|2026-01-01T00:00:00|2026-01-01T00:00:01|1:00|salvus:\n"
                     "this is not squeue output\n", Named)
    assert str(e.value) == ("squeue: unexpected output on line 2: 'this is not squeue output' "
                            "(expected JOBID|NAME|STATE|REASON|SUBMIT_TIME|START_TIME|TIME_LIMIT|COMMENT)")


def test_squeue_printing_garbage_is_one_line_and_submits_nothing(tmp_path, demo_image, slurm_cluster, cli):
    # A stand-in squeue (Slurm itself never prints this): proves a garbled answer cannot turn into
    # "no jobs" and a resubmission.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\necho 'slurm_load_jobs: garbled <html>'\n")
    (bin_dir / "squeue").chmod(0o755)
    (bin_dir / "sbatch").symlink_to("/usr/bin/sbatch")
    spec = slurm_spec(tmp_path, demo_image, extra=f", bin_dir: {bin_dir}")
    r = cli("--spec", str(spec), "scale", "sage=1")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "squeue: unexpected output on line 1: 'slurm_load_jobs: garbled <html>'" in r.stderr
    assert slurm_cluster.run("squeue", "-h", "--name", f"{load_spec(spec).site}.sage").stdout == ""


def test_missing_scheduler_command_is_one_line(tmp_path, demo_image, cli):
    spec = slurm_spec(tmp_path, demo_image, extra=f", bin_dir: {tmp_path}/empty")
    r = cli("--spec", str(spec), "scale", "sage=1")
    assert r.returncode == 75
    assert r.stderr == (f"salvus_jobs: {tmp_path}/empty/squeue: command not found "
                        "(is the scheduler's client installed and on PATH?)\n")


def test_unreachable_slurm_controller_is_one_line(tmp_path, demo_image, slurm_cluster, cli):
    conf = tmp_path / "slurm.conf"
    text = slurm_cluster.conf.read_text()
    port = next(ln for ln in text.splitlines() if ln.startswith("SlurmctldPort=")).split("=")[1]
    # Nothing listens on port 9; short timeouts so the client gives up in seconds.
    conf.write_text(text.replace(f"SlurmctldPort={port}", "SlurmctldPort=9")
                    .replace("MessageTimeout=30", "MessageTimeout=2\nTCPTimeout=1"))
    spec = slurm_spec(tmp_path, demo_image)
    r = cli("--spec", str(spec), "status", env={"SLURM_CONF": str(conf)}, timeout=120)
    assert r.returncode == 75, r.stderr
    assert r.stderr.startswith("salvus_jobs: squeue: the slurm scheduler is unreachable:")
    assert r.stderr.count("\n") == 1


EXAMPLES = Path(__file__).resolve().parent.parent / "submit" / "examples"


@pytest.fixture
def advertise(slurm_cluster):
    """Sets the node's features as the README's `scontrol update` line does with `imgdist
    slurm-features` output; the node advertises nothing again afterwards."""
    def set_features(features: str) -> None:
        r = slurm_cluster.run("scontrol", "update", f"NodeName={slurm_cluster.node}",
                              f"AvailableFeatures={features}", f"ActiveFeatures={features}")
        assert r.returncode == 0, r.stderr
    yield set_features
    set_features("")


@pytest.mark.parametrize("role", ["sage", "hub", "cassandra"])
def test_shipped_sbatch_and_pbs_examples_are_accepted_as_written(role, slurm_cluster, advertise, tmp_path):
    from imagedist.classad import slurm_feature
    from submit.render_examples import EXAMPLE_SPEC

    sbatch, pbs = EXAMPLES / f"{role}_vm.sbatch", EXAMPLES / f"{role}_vm.pbs"
    for script in (sbatch, pbs):
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
        assert "\nwrapper=${SALVUS_VMJOB:-/usr/local/bin/salvus-vmjob}\nspec=${SALVUS_SPEC:-/etc/salvus/cluster.yaml}\n" \
            in script.read_text()
        assert f'\nexec "$wrapper" --spec "$spec" --role {role} ' in script.read_text()
    # The node holds the example's image, as imgdist would advertise it.
    r = load_spec(EXAMPLE_SPEC).role(role)
    feature = slurm_feature(r.image_name, r.image_version)
    advertise(feature)
    # Slurm parses every #SBATCH line and finds a node that fits (without queueing anything).
    r = slurm_cluster.run("sbatch", "--test-only", str(sbatch))
    assert r.returncode == 0 and "to start at" in r.stderr, r.stderr
    # Through Slurm's qsub the #PBS lines ask for the same feature (held: it never runs).
    q = subprocess.run([str(TORQUE_BIN / "qsub"), "-h", "-o", str(tmp_path / "o"), "-e", str(tmp_path / "e"), str(pbs)],
                       capture_output=True, text=True, timeout=60, env={**os.environ, **slurm_cluster.env})
    assert q.returncode == 0, q.stderr
    try:
        assert slurm_cluster.run("squeue", "-h", "-j", q.stdout.strip(), "-o", "%f").stdout.strip() == feature
    finally:
        slurm_cluster.run("scancel", q.stdout.strip())


def test_slurm_job_waits_for_a_node_that_advertises_its_image_version(tmp_path, imgdist_lab, slurm_cluster, advertise, cli):
    from catalogue.approvals import approve, unapprove

    imgdist_lab.add_image("sage", "1.0", 1, roles=("sage",))
    imgdist_lab.add_image("sage", "2.0", 1, roles=("sage",))
    imgdist_lab.sign()
    host = imgdist_lab.host("h0", approve=("sage@1.0",), tracker=False)

    def host_pulls_and_advertises() -> str:
        assert imgdist_lab.run(host, "sync").returncode == 0
        features = imgdist_lab.run(host, "slurm-features").stdout.strip()
        advertise(features)
        return features

    assert host_pulls_and_advertises() == "salvus_img_sage_v1_d0"
    # The job: sage@2.0 from the store; a stand-in for the wrapper keeps it running until cancelled.
    spec = standin_spec(tmp_path, f"backend: slurm, bin_dir: {TORQUE_BIN}, extra_directives: [--hold]", "sage@2.0")
    site = load_spec(spec).site
    backend = open_backend(load_spec(spec))
    try:
        # A host holding sage@1.0 only is no place for a sage@2.0 job: Slurm refuses it outright.
        r = cli("--spec", str(spec), "scale", "sage=1")
        assert r.returncode == 1 and "no node advertises salvus_img_sage_v2_d0 (sage@2.0)" in r.stderr, r.stderr
        assert backend.list("sage") == []
        with pytest.raises(SalvusError, match="^qsub failed .*: no node advertises salvus_img_sage_v2_d0 "):
            open_backend(load_spec(spec), "pbs").submit_one("sage", None)  # #PBS -l proc=: the same

        approve(load_spec(host), "sage@2.0")
        assert host_pulls_and_advertises() == "salvus_img_sage_v1_d0,salvus_img_sage_v2_d0"
        assert cli("--spec", str(spec), "scale", "sage=1").returncode == 0
        [job] = backend.list("sage")
        assert slurm_cluster.run("squeue", "-h", "-j", job.job_id, "-o", "%f").stdout.strip() == "salvus_img_sage_v2_d0"
        # The host stops advertising sage@2.0 while the job is held; released, it waits on the idle node.
        unapprove(load_spec(host), "sage@2.0")
        assert host_pulls_and_advertises() == "salvus_img_sage_v1_d0"
        assert slurm_cluster.run("scontrol", "release", job.job_id).returncode == 0

        def state() -> str:
            return slurm_cluster.run("squeue", "-h", "-j", job.job_id, "-o", "%T %r").stdout.strip()

        wait_for(lambda: state() == "PENDING BadConstraints", 30, "pending on a node without the feature")
        assert slurm_cluster.run("sinfo", "-h", "-n", slurm_cluster.node, "-o", "%T").stdout.strip() == "idle"
        approve(load_spec(host), "sage@2.0")
        host_pulls_and_advertises()
        wait_for(lambda: state() == "RUNNING None", 120, "running once the node advertises the image")
    finally:
        slurm_cluster.run("scancel", "--name", f"{site}.sage")


def test_persistent_role_gets_lowest_free_stable_ids_pinned_to_its_disk_host(tmp_path, demo_image, stop_everything_after,
                                                                           slurm_cluster, cli):
    spec = slurm_spec(tmp_path, demo_image, extra=', extra_directives: ["--begin=now+3600"]')
    # Two hypervisors: cassandra-K's disk lives on hosts[K]; only this node exists, so pin both here
    # for submission and check the rendering for another host separately.
    spec.write_text(spec.read_text().replace("persistent: [", f"hosts: [{slurm_cluster.node}]\n    persistent: ["))
    stop_everything_after(spec)
    assert cli("--spec", str(spec), "scale", "cassandra=2").returncode == 0
    backend = open_backend(load_spec(spec))
    jobs = {j.service_id: j for j in backend.list("cassandra")}
    assert set(jobs) == {"cassandra-0", "cassandra-1"}
    slurm_cluster.run("scancel", jobs["cassandra-0"].job_id)
    r = cli("--spec", str(spec), "scale", "cassandra=2")
    assert "submit 1" in r.stdout, r.stdout
    live_ids = sorted(j.service_id for j in backend.list("cassandra") if j.state == "queued")
    assert live_ids == ["cassandra-0", "cassandra-1"]  # the lowest free id again: the same disk
    squeue = slurm_cluster.run("squeue", "-h", "-n", f"{load_spec(spec).site}.cassandra", "-o", "%k %N %R").stdout
    assert "salvus:cassandra-0" in squeue and "salvus:cassandra-1" in squeue

    # Without the Slurm-only directive: an HTCondor description refuses a '--option' line.
    two_hosts = spec.read_text().replace(f"hosts: [{slurm_cluster.node}]", "hosts: [hv0, hv1]")
    spec.write_text(two_hosts.replace(', extra_directives: ["--begin=now+3600"]', ""))
    for scheduler, pinned in (("slurm", "#SBATCH --nodelist=hv1"), ("pbs", "#PBS -l host=hv1"),
                              ("condor", 'TARGET.Machine == "hv1"')):
        r = cli("--spec", str(spec), "render", "cassandra", "--scheduler", scheduler, "--service-id", "cassandra-1")
        assert pinned in r.stdout and "cassandra-1" in r.stdout, (scheduler, r.stdout)


@pytest.mark.vm
def test_slurm_lists_the_walltime_clock_and_image_and_a_successor_waits_for_its_predecessor(
        tmp_path, demo_image, stop_everything_after, slurm_cluster):
    spec_path = slurm_spec(tmp_path, demo_image, extra=", walltime: '10:00'")
    stop_everything_after(spec_path)
    backend = open_backend(load_spec(spec_path))
    (first,) = backend.submit("sage", 1)
    try:
        wait_for(lambda: first.service_id in live(spec_path, "sage"), 240, "the predecessor registered")
    except AssertionError:
        raise AssertionError(logs_of(spec_path)) from None

    def listed(job_id: str):
        return next((j for j in backend.list("sage") if j.job_id == job_id), None)

    running = listed(first.job_id)
    assert running.state == "running" and running.started is not None
    assert abs(running.started - time.time()) < 300  # Slurm's own start time, not a guess of ours
    assert (running.walltime_s, running.image) == (600, "demo@1")
    assert backend.earliest_signal(running) == running.started + 600 - backend.signal_lead_s("sage") - 60

    second = backend.submit_successor(running)
    assert second.service_id == first.service_id and second.job_id in backend.recorded_ids()
    waiting = slurm_cluster.run("squeue", "-h", "-j", second.job_id, "-o", "%T|%r|%E").stdout.strip()
    assert waiting.startswith("PENDING|Dependency|afterany:" + first.job_id), waiting
    assert listed(second.job_id).state == "queued" and listed(second.job_id).started is None

    backend.cancel(running)
    wait_for(lambda: (j := listed(second.job_id)) and j.state == "running", KILL_WAIT + 30, "the successor running")
    ended = wait_for(lambda: (j := listed(first.job_id)) and j.state == "done" and j, 30, "the predecessor ended")
    assert ended.ended_by == "cancel"
    # The same service id again, now registered by the successor's job.
    wait_for(lambda: (s := live(spec_path, "sage").get(first.service_id)) and s.job_id == second.job_id,
             240, "the successor registered under the predecessor's service id")


def test_pbs_successor_asks_qsub_to_wait_for_its_predecessor(tmp_path, demo_image, stop_everything_after, slurm_cluster):
    # No VM: the predecessor is a held job submitted by hand, so neither ever starts; what is under
    # test is that the successor reaches the scheduler with the dependency (Slurm's qsub wrapper).
    spec = scheduler_spec(tmp_path, demo_image, "pbs", extra=f", bin_dir: {TORQUE_BIN}")
    stop_everything_after(spec)
    backend = open_backend(load_spec(spec))
    held = slurm_cluster.run("sbatch", "--parsable", "--hold", "-o", "/dev/null", "--wrap", "sleep 600").stdout.strip()
    try:
        second = backend.submit_successor(Job(held, "sage", "running", "sage-0", time.time(), backend="pbs"))
        assert second.service_id == "sage-0" and second.job_id in backend.recorded_ids()
        waiting = slurm_cluster.run("squeue", "-h", "-j", second.job_id, "-o", "%T|%r|%E").stdout.strip()
        assert waiting.startswith(f"PENDING|Dependency|afterany:{held}"), waiting
        assert [(j.job_id, j.state) for j in backend.list("sage")] == [(second.job_id, "queued")]
    finally:
        slurm_cluster.run("scancel", held)


def test_slurm_node_fits_a_surge_beside_two_jobs_on_this_machine(slurm_cluster, tmp_path, demo_image):
    # Three jobs the size of a demo VM's (1 cpu, 128 MiB + QEMU's 256) run at once on the fixture's
    # node even on a 2-core machine: a successor or an upgrade's surge of 1 over count 2 fits.
    ids = [slurm_cluster.run("sbatch", "--parsable", "-c", "1", "--mem=384", "-o", "/dev/null", "--wrap", "sleep 120").stdout.strip()
           for _ in range(3)]
    try:
        wait_for(lambda: slurm_cluster.run("squeue", "-h", "-j", ",".join(ids), "-o", "%T").stdout.split()
                 == ["RUNNING"] * 3, 60, "three jobs running at once")
    finally:
        slurm_cluster.run("scancel", *ids)
