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
from tests.test_controller import healthy_one  # reads only .status(): RootController's too

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

    def __init__(self, pool, image, extra: str = "", sage: str = "", image_path: str = "",
                 **hypervisor: object) -> None:
        self.pool = pool
        self.dir = pool.workdir()
        self.name = f"c{next(_sites)}{self.dir.name[-5:].lower().replace('_', '')}"
        self.spec = self.dir / "cluster.yaml"
        scheduler = (f"{{backend: condor, schedd: {pool.schedd_name}, "
                     f"submit_user: {JOB_USER}, log_dir: {self.dir}/logs{extra}}}")
        roles = demo_spec_text(image, self.dir / "store", **hypervisor)
        if image_path:
            roles = roles.replace(f"image_path: {image.disk}", f"image_path: {image_path}")
        if sage:  # more lines for the sage role
            roles = roles.replace("    port: 6000\n", f"    port: 6000\n    {sage}\n", 1)
        self.spec.write_text(f"site: {self.name}\nscheduler: {scheduler}\n" + roles)
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

    def condor(self, *argv: str) -> str:
        """A condor_* command as the site's account, as an operator types it."""
        return self.pool.check(*argv, user=JOB_USER)

    def ad_wait(self, job_id: str, check, what: str, timeout: float = 90, *attrs: str) -> dict:
        attrs = attrs or ("JobStatus", "NumJobStarts", "HoldReason", "HoldReasonCode", "ExitCode", "RemoteHost")
        return wait_for(lambda: (lambda ad: ad if check(ad) else None)(self.job_ad(job_id, *attrs)), timeout, what)

    def qemu_left(self, service_id: str) -> list[str]:
        """QEMU processes of `service_id` still running anywhere on this machine."""
        r = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True)
        return [line for line in r.stdout.splitlines() if service_id in line]

    def stop(self) -> None:
        self.salvus_jobs("stop", "--all", timeout=JOB_MAX_VACATE_S + 60)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def site(condor_pool, condor_image):
    made: list[Site] = []

    def make(extra: str = "", sage: str = "", image_path: str = "", **hypervisor: object) -> Site:
        made.append(Site(condor_pool, condor_image, extra, sage, image_path, **hypervisor))
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


def test_vacate_hold_release_and_remove_each_take_the_path_htcondor_gives_them(site):
    s = site()
    assert s.salvus_jobs("scale", "sage=1").returncode == 0
    (sid, svc), = s.wait_registered(1).items()
    job_id = svc["job_id"]
    err = lambda: next((s.dir / "logs").glob(f"*.{job_id}.err")).read_text()  # noqa: E731

    # condor_vacate_job: SIGTERM, a clean stop, deregistered; HTCondor runs the job again.
    s.condor("condor_vacate_job", job_id)
    wait_for(lambda: sid not in s.services(), JOB_MAX_VACATE_S, "deregistered after vacate")
    assert "SIGTERM: stopping the VM" in err() and "guest shut down in" in err(), err()
    s.ad_wait(job_id, lambda ad: ad.get("NumJobStarts", 0) >= 2 and ad.get("JobStatus") == 2, "run again after vacate")
    s.wait_registered(1)

    # condor_hold: the job is held (its processes killed, QEMU with them); released, it runs again.
    s.condor("condor_hold", job_id)
    s.ad_wait(job_id, lambda ad: ad.get("JobStatus") == 5, "held")
    wait_for(lambda: not s.qemu_left(sid), JOB_MAX_VACATE_S, "no QEMU left after hold")
    wait_for(lambda: sid not in s.services(), 30, "the held job's service expired")
    held = [j for j in s.backend().list("sage") if j.job_id == job_id]
    assert held[0].state == "held" and held[0].hold_reason, held
    s.condor("condor_release", job_id)
    s.wait_registered(1)
    assert s.job_ad(job_id, "NumJobStarts")["NumJobStarts"] >= 3

    # condor_rm: SIGTERM, clean stop within job_max_vacate_time, deregistered, nothing left.
    t0 = time.monotonic()
    s.condor("condor_rm", job_id)
    wait_for(lambda: sid not in s.services(), JOB_MAX_VACATE_S, "deregistered after condor_rm")
    wait_for(lambda: not s.backend().list("sage"), JOB_MAX_VACATE_S, "left the queue")
    assert time.monotonic() - t0 < JOB_MAX_VACATE_S
    # The .err file is the last run's (HTCondor truncates it at each start).
    assert "SIGTERM: stopping the VM" in err() and "guest shut down in" in err(), err()
    assert not s.qemu_left(sid)
    backend = s.backend()
    gone = wait_for(lambda: backend.known_but_not_listed("sage", []), 30, "the job in the history")
    assert [(j.job_id, j.state, j.ended_by) for j in gone] == [(job_id, "done", "cancel")]


def test_exit_75_is_run_again_and_exits_65_and_78_are_held_with_the_reason_in_status(site):
    # 75: a guest that cannot come up in 1 s is a transient failure; HTCondor runs it again.
    transient = site(boot_timeout=1)
    assert transient.salvus_jobs("scale", "sage=1").returncode == 0
    job, = transient.backend().list("sage")
    ad = transient.ad_wait(job.job_id, lambda ad: ad.get("NumJobStarts", 0) >= 2 and ad.get("ExitCode") == 75,
                           "a second start after exit 75")
    assert ad.get("JobStatus") != 5, ad
    assert "Normal termination (return value 75)" in transient.logs()  # the job's event log
    transient.salvus_jobs("stop", "--all", timeout=90)

    # 65: the image is missing (trust/image failure); 78: a network the wrapper does not run.
    for extra, code, words in ((dict(image_path="/nonexistent/disk.qcow2"), 65, "image or trust failure"),
                               (dict(sage="network: bridge\n    bridge: br-none"), 78, "configuration error")):
        s = site(**extra)
        assert s.salvus_jobs("scale", "sage=1").returncode == 0
        job, = s.backend().list("sage")
        ad = s.ad_wait(job.job_id, lambda ad: ad.get("JobStatus") == 5, f"held after exit {code}")
        assert ad["HoldReason"] == f"salvus-vmjob exited {code}: {words}", ad
        st = s.status()
        assert st["roles"]["sage"]["held"] == 1 and st["jobs"][0]["hold_reason"].startswith(f"salvus-vmjob exited {code}")
        # Held, not replaced: a held job is one of ours and counts.
        r = s.salvus_jobs("scale", "sage=1")
        assert "nothing to do" in r.stdout and f"held {job.job_id}" in r.stdout, r.stdout
        assert s.job_ad(job.job_id, "NumJobStarts")["NumJobStarts"] == 1


def test_a_job_removed_behind_our_back_is_resubmitted_once(site):
    # Jobs that cannot match (no node has this attribute): they stay idle while we reconcile.
    s = site(extra=", requirements: 'TARGET.SalvusNever =?= true'")
    assert s.salvus_jobs("scale", "hub=2").returncode == 0
    jobs = s.backend().list("hub")
    assert len(jobs) == 2 and {j.state for j in jobs} == {"queued"}
    victim = jobs[0]
    s.condor("condor_rm", victim.job_id)
    r = s.salvus_jobs("scale", "hub=2", "--dry-run")
    assert f"gone {victim.job_id}" in r.stdout and "submit 1" in r.stdout, r.stdout
    r = s.salvus_jobs("scale", "hub=2")
    assert "submitted condor job" in r.stdout, r.stdout
    r = s.salvus_jobs("scale", "hub=2")
    assert "nothing to do" in r.stdout and "gone" not in r.stdout, r.stdout
    assert len([j for j in s.backend().list("hub") if j.state == "queued"]) == 2


def test_another_users_look_alike_jobs_never_count_and_are_never_removed(site, condor_pool):
    # Ours never match (no node has the attribute), so nothing boots; theirs carry our site's
    # Salvus* attributes, one of them held.
    s = site(extra=", requirements: 'TARGET.SalvusNever =?= true'")
    other = "salvus-other"
    condor_pool.add_user(other)
    text = (f"executable = /bin/sleep\narguments = 600\ninitialdir = /tmp\nshould_transfer_files = NO\n"
            f"requirements = TARGET.SalvusNever =?= true\n+SalvusSite = \"{s.name}\"\n+SalvusRole = \"sage\"\n"
            f"+SalvusServiceId = \"sage-$(ClusterId).$(ProcId)\"\n+SalvusImage = \"demo@1\"\nqueue 2\n")
    out = condor_pool.check("condor_submit", "-terse", "-", user=other, input=text)
    theirs = out.split()[0].split(".")[0]
    condor_pool.check("condor_hold", f"{theirs}.0", user=other)
    try:
        r = s.salvus_jobs("scale", "sage=2")
        assert r.returncode == 0 and "submit 2" in r.stdout, r.stdout + r.stderr
        ours = s.backend().list("sage")
        assert len(ours) == 2 and not any(j.job_id.startswith(f"{theirs}.") for j in ours)
        assert {j["job_id"] for j in s.status()["jobs"]} == {j.job_id for j in ours}
        r = s.salvus_jobs("scale", "sage=1")
        assert "cancel 1" in r.stdout, r.stdout
        r = s.salvus_jobs("stop", "--all")
        assert r.returncode == 0, r.stderr
        left = condor_pool.check("condor_q", "-all", "-af", "ClusterId", "ProcId", "JobStatus", "Owner",
                                 f"-constraint", f"ClusterId == {theirs}")
        assert sorted(left.split("\n")[:-1]) == [f"{theirs} 0 5 {other}", f"{theirs} 1 1 {other}"], left
    finally:
        condor_pool.run("condor_rm", theirs, user=other)


def test_allowed_job_duration_holds_the_job_after_a_clean_stop_and_scale_replaces_it(site):
    s = site(extra=", walltime: '0:45'")
    assert s.salvus_jobs("scale", "sage=1").returncode == 0
    (sid, svc), = s.wait_registered(1).items()
    backend = s.backend()
    job, = backend.list("sage")
    assert job.walltime_s == 45 and job.started
    # HTCondor signals at start + duration; the controller counts from there less the grace.
    assert backend.earliest_signal(job) == job.started + 45 - backend.resources("sage").grace_s
    ad = s.ad_wait(job.job_id, lambda ad: ad.get("JobStatus") == 5, "held by allowed_job_duration", 120)
    assert ad["HoldReasonCode"] == 46, ad
    wait_for(lambda: sid not in s.services(), 30, "deregistered")
    err = next((s.dir / "logs").glob(f"*.{job.job_id}.err")).read_text()
    assert "SIGTERM: stopping the VM" in err and "guest shut down in" in err, err
    held, = backend.list("sage")
    assert (held.state, held.ended_by) == ("failed", "walltime")
    r = s.salvus_jobs("scale", "sage=1")
    assert "submit 1" in r.stdout, r.stdout + r.stderr
    # The held job is removed from the queue, not left there.
    wait_for(lambda: job.job_id not in {j.job_id for j in backend.list("sage")}, 30, "the held job removed")
    # Forgotten by scale; the schedd's history still says how it ended.
    from submit.condor import PROJECTION, job_from_ad

    ad = s.ad_wait(job.job_id, lambda ad: ad.get("JobStatus") == 3, "removed", 30, *PROJECTION)
    gone = job_from_ad(ad, "condor", history=True)
    assert (gone.state, gone.ended_by) == ("done", "walltime"), ad


@pytest.fixture
def catalogue_lab(condor_pool, condor_image):
    """A signed catalogue (the imgdist lab's, under a directory the pool's users can read) holding
    the shipped files' images sage@10.2, hub@3.1 and cassandra@4.1, each the demo guest's disk."""
    from catalogue.endorse import CatalogueDir, add_image
    from tests.fixtures.imgdist_lab import Lab

    lab = Lab(condor_pool.workdir())
    lab.start_http()
    try:
        for ref in ("sage@10.2", "hub@3.1", "cassandra@4.1"):
            name, version = ref.split("@")
            add_image(CatalogueDir(lab.cat_dir), condor_image.disk, name, version, [name], [], lab.url)
        add_image(CatalogueDir(lab.cat_dir), condor_image.kernel, "demo-kernel", "1", [], [], lab.url)
        add_image(CatalogueDir(lab.cat_dir), condor_image.initrd, "demo-initrd", "1", [], [], lab.url)
        lab.sign()
        yield lab
    finally:
        lab.stop()
        for node in NODES:
            condor_pool.write_node_spec(node, "roles: {}\n")
        shutil.rmtree(lab.root, ignore_errors=True)


def node_spec(lab, node: str, image) -> Path:
    """A node's spec, as a site installs /etc/salvus/cluster.yaml on it: its store, the catalogue,
    the shipped files' roles (booting the demo guest's kernel and initrd, catalogue entries too)
    and a fast registry."""
    from cluster.spec import load_spec as load
    from catalogue.approvals import approve
    from tests.fixtures._daemons import free_port

    d = lab.root / node
    d.mkdir()
    boot = "boot: {kernel: demo-kernel@1, initrd: demo-initrd@1}"  # with the catalogue on, entries too
    roles = (f"roles:\n  sage: {{image: sage@10.2, {boot}, memory_mb: 128, port: 6000, "
             "probe: {send: \"1+1\\n\", expect: \"2\"}}\n"
             f"  hub: {{image: hub@3.1, {boot}, memory_mb: 128, port: 8080, upstreams: [sage], "
             "probe: {send: \"GET /health HTTP/1.0\\r\\n\\r\\n\", expect: \"200 OK\"}}\n"
             f"  cassandra: {{image: cassandra@4.1, {boot}, memory_mb: 128, port: 9042, "
             "persistent: [{name: data, size_mb: 64, mount: /data}], probe: {expect: \"boots=\"}}\n")
    text = lab.spec_text(d / "store", free_port(), tracker=False).split("\n", 2)
    spec = d / "cluster.yaml"
    spec.write_text(f"site: salvus\n{text[0]}\n{roles}{text[2]}"
                    "registry: {ttl: 6, heartbeat_interval: 1}\n"
                    "hypervisor: {libvirt: never, boot_timeout: 150, stop_timeout: 15}\n"
                    "ssh_keys: [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOr5a3bPpvs0sh8Q7dS8f3bA6Z+vKkIY3m5x0V8xY0cC t@s\"]\n")
    for ref in ("sage@10.2", "hub@3.1", "cassandra@4.1", "demo-kernel@1", "demo-initrd@1"):
        approve(load(spec), ref)
    return spec


def test_shipped_submit_files_wait_for_a_node_that_holds_the_image_and_boot_there(condor_pool, condor_image,
                                                                                 catalogue_lab):
    lab = catalogue_lab
    spec = node_spec(lab, "node-a", condor_image)
    node_b = node_spec(lab, "node-b", condor_image)
    for node, path in (("node-a", spec), ("node-b", node_b)):
        condor_pool.write_node_spec(node, path.read_text())
    subprocess.run(["chown", "-R", f"{JOB_USER}:{JOB_USER}", str(lab.root)], check=True)
    subprocess.run(["chmod", "-R", "a+rX", str(lab.root)], check=True)
    # Nothing pulled yet: both nodes' startd cron advertises no image.
    wait_for(lambda: all(m.get("SalvusImages") == "" for m in condor_pool.machines().values()), 30,
             "both nodes advertising SalvusImages = \"\"")

    # As the docs tell an operator (SALVUS_VMJOB is the install's /usr/local/bin/salvus-vmjob), with
    # the shipped files copied byte for byte to where the submit machine can read them.
    shipped = lab.root / "examples"
    shipped.mkdir()
    for role in ("sage", "hub", "cassandra"):
        shutil.copyfile(EXAMPLES / f"{role}_vm.sub", shipped / f"{role}_vm.sub")
    subprocess.run(["chmod", "-R", "a+rX", str(shipped)], check=True)

    def submit(role: str) -> str:
        out = condor_pool.check("condor_submit", "-terse", f"SALVUS_SPEC={spec}", str(shipped / f"{role}_vm.sub"),
                                user=JOB_USER)
        return out.split()[0]

    job_id = submit("sage")  # -terse: "C.0 - C.0"
    time.sleep(8)  # a few negotiation cycles
    why = condor_pool.check("condor_q", "-better-analyze", job_id, user=JOB_USER)
    assert 'stringListMember("sage-10.2",TARGET.SalvusImages)' in why.replace(" ", ""), why
    assert "No successful match recorded" in why or "no match found" in why, why
    assert condor_pool.check("condor_q", job_id, "-af", "JobStatus", user=JOB_USER).strip() == "1"

    # node-a pulls the images (imgdist sync, as its timer would); its cron advertises them and
    # the job starts there, registers under its ClusterId.ProcId.
    r = lab.run(spec, "sync", timeout=180)
    assert r.returncode == 0, r.stderr
    subprocess.run(["chown", "-R", f"{JOB_USER}:{JOB_USER}", str(lab.root / "node-a")], check=True)
    subprocess.run(["chmod", "-R", "a+rX", str(lab.root / "node-a")], check=True)
    wait_for(lambda: condor_pool.machines()["node-a"].get("SalvusImages"), 30, "node-a advertising its images")
    assert {"sage-10.2", "hub-3.1", "cassandra-4.1"} <= set(condor_pool.machines()["node-a"]["SalvusImages"].split(","))
    assert condor_pool.machines()["node-b"].get("SalvusImages") == ""
    hub, cassandra = submit("hub"), submit("cassandra")

    def registered(role: str, service_id: str):
        r = condor_pool.run("salvus_jobs", "--spec", str(spec), "services", "--json", role, user=JOB_USER)
        return r.returncode == 0 and next((s for s in json.loads(r.stdout) if s["service_id"] == service_id), None)

    try:
        for role, jid, sid in (("sage", job_id, f"sage-{job_id}"), ("hub", hub, f"hub-{hub}"),
                               ("cassandra", cassandra, "cassandra-0")):
            try:
                svc = wait_for(lambda: registered(role, sid), 180, f"{role} registered")
            except AssertionError:
                raise AssertionError(condor_pool.check("sh", "-c", "tail -n 30 /var/lib/salvus/logs/*.err")) from None
            assert (svc["scheduler"], svc["job_id"]) == ("condor", jid)
            host = condor_pool.check("condor_q", jid, "-af", "RemoteHost", user=JOB_USER).strip()
            assert host.endswith("@node-a"), host
    finally:
        condor_pool.run("condor_rm", job_id, hub, cassandra, user=JOB_USER)
    wait_for(lambda: not registered("sage", f"sage-{job_id}"), JOB_MAX_VACATE_S, "sage deregistered")


class RootController:
    """A `salvus_jobs controller` run as the site's account inside the root, its stderr in a file."""

    def __init__(self, site: Site) -> None:
        from tests.fixtures.condor import namespace_command

        self.log = site.dir / "controller.log"
        self.err = open(self.log, "w")
        tokens = f"/srv/pool/users/{JOB_USER}/tokens.d"
        self.proc = subprocess.Popen(namespace_command(["salvus_jobs", "--spec", str(site.spec), "controller"],
                                                       user=JOB_USER, env={"_CONDOR_SEC_TOKEN_DIRECTORY": tokens}),
                                     stdout=subprocess.DEVNULL, stderr=self.err, start_new_session=True)
        self.port = load_spec(site.spec).controller.listen.rpartition(":")[2]

    def text(self) -> str:
        return self.log.read_text()

    def wait_log(self, needle: str, timeout: float = 60) -> int:
        at = wait_for(lambda: self.text().find(needle) + 1 or (self.proc.poll() is not None and -1), timeout,
                      f"{needle!r} in the controller's log")
        assert at > 0, f"controller exited {self.proc.returncode}:\n{self.text()[-3000:]}"
        return at - 1 + len(needle)

    def status(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/status", timeout=5) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        import os
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.err.close()


@pytest.fixture
def controller():
    started: list[RootController] = []

    def start(site: Site) -> RootController:
        started.append(RootController(site))
        return started[-1]
    yield start
    for c in started:
        c.stop()


def controller_line(extra: str = "") -> str:
    from tests.fixtures._daemons import free_port

    return (f"controller: {{interval: 1, lease: 4, listen: '127.0.0.1:{free_port()}', unhealthy_after: 2, "
            f"probe_timeout: 1, cancel_after: 2{extra}}}\n")


def test_controller_on_condor_handles_a_killed_vm_a_hung_guest_and_a_held_job(site, controller):
    import os
    import signal

    s = site()
    with open(s.spec, "a") as f:
        f.write(controller_line())
    c = controller(s)
    c.wait_log("acquired with token")
    assert s.salvus_jobs("scale", "sage=1").returncode == 0
    first = wait_for(lambda: healthy_one(c), 180, "one healthy sage")

    # A killed VM: the wrapper exits 75 and HTCondor runs the job again (same job, a new start).
    (qemu,) = [int(line.split()[0]) for line in s.qemu_left(first["service_id"])]
    os.kill(qemu, signal.SIGKILL)
    s.ad_wait(first["job_id"], lambda ad: ad.get("NumJobStarts", 0) >= 2 and ad.get("JobStatus") == 2,
              "the job run again after its VM was killed")
    again = wait_for(lambda: healthy_one(c), 180, "healthy again after the kill")
    assert again["job_id"] == first["job_id"]

    # A hung guest: unhealthy, its job removed (condor_rm), a replacement becomes healthy.
    (hung,) = [int(line.split()[0]) for line in s.qemu_left(again["service_id"])]
    os.kill(hung, signal.SIGSTOP)
    try:
        c.wait_log(f"unhealthy: {again['service_id']} failed 2 probes in a row")
        second = wait_for(lambda: healthy_one(c, exclude={again["service_id"]}), 180, "a replacement")
        wait_for(lambda: not s.qemu_left(again["service_id"]), JOB_MAX_VACATE_S + 30, "the hung VM gone")
    finally:
        if s.qemu_left(again["service_id"]):
            os.kill(hung, signal.SIGCONT)
    assert second["job_id"] != first["job_id"]

    # A held job: reported with its reason, counted, not replaced (as on Slurm).
    s.condor("condor_hold", "-reason", "operator check", second["job_id"])
    st = wait_for(lambda: (lambda st: st if st["roles"]["sage"].get("held") == 1 else None)(c.status()), 60,
                  "the controller reporting the held job")
    time.sleep(5)  # a few cycles: nothing is submitted in its place
    mine = [j.job_id for j in s.backend().list("sage")]
    assert mine == [second["job_id"]], (mine, st)
    s.condor("condor_release", second["job_id"])
    wait_for(lambda: healthy_one(c), 180, "healthy after the release")


def test_a_persistent_roles_successor_is_released_on_its_node_the_moment_the_disk_is_free(site, controller):
    # 80 s: HTCondor's earliest signal is the limit less the grace (stop 5 + 15 s), so the successor
    # itself must serve a while before its own succession drains it (50 s left it 8 s).
    s = site(extra=", walltime: '01:20'")
    text = s.spec.read_text().replace("    port: 9042\n", "    port: 9042\n    count: 1\n    drain_seconds: 1\n"
                                      "    stop_timeout: 5\n", 1)
    s.spec.write_text(text + controller_line(", lead_floor: 10"))
    c = controller(s)
    first = s.wait_registered(1, "cassandra", 180)["cassandra-0"]
    host = s.job_ad(first["job_id"], "RemoteHost")["RemoteHost"].rpartition("@")[2]
    c.wait_log("successor job", timeout=120)
    successor = next(j for j in s.backend().list("cassandra") if j.after == first["job_id"])
    assert successor.state == "queued" and successor.hold_reason.startswith("waiting for its predecessor")
    assert s.job_ad(successor.job_id, "JobStatus")["JobStatus"] == 5  # held while the disk is in use
    c.wait_log(f"released: job {first['job_id']} has left the queue", timeout=120)
    at = c.wait_log("handover: cassandra: cassandra-0 serves again from job", timeout=120)
    gap = float(c.text()[at:].split(",")[1].split("s after")[0])
    assert "walltime: cassandra job" not in c.text(), c.text()
    row = wait_for(lambda: s.services("cassandra").get("cassandra-0"), 10, "cassandra-0 in the registry")
    assert row["job_id"] == successor.job_id
    assert s.job_ad(successor.job_id, "RemoteHost")["RemoteHost"].endswith(f"@{host}")
    # The successor found its predecessor's data: the demo guest counts its boots on the disk.
    import socket

    with socket.create_connection((row["host"], row["port"]), timeout=5) as conn:
        assert b"boots=2" in conn.recv(200)
    assert 0 < gap < 60


def test_queued_jobs_are_re_placed_off_an_unfit_host_and_a_persistent_role_runs_where_its_disk_is(site):
    s = site()
    text = s.spec.read_text().replace("    port: 9042\n", "    port: 9042\n    hosts: [node-b]\n", 1)
    s.spec.write_text(text)
    # Held as soon as they are queued, so the exclusion comes before any match.
    assert s.salvus_jobs("scale", "sage=2").returncode == 0
    jobs = s.backend().list("sage")
    s.condor("condor_hold", *(j.job_id for j in jobs))
    backend = s.backend()
    assert backend.exclude_hosts(jobs, ["node-a"])
    for j in jobs:
        req = s.job_ad(j.job_id, "Requirements")["Requirements"]
        assert 'TARGET.Machine != "node-a"' in str(req), req
    s.condor("condor_release", *(j.job_id for j in jobs))
    s.wait_registered(2)
    assert {s.job_ad(j.job_id, "RemoteHost")["RemoteHost"].rpartition("@")[2] for j in jobs} == {"node-b"}

    # cassandra-0's disk lives on hosts[0] = node-b: its job runs there, whatever node-a offers.
    assert s.salvus_jobs("scale", "cassandra=1").returncode == 0
    (svc,) = s.wait_registered(1, "cassandra").values()
    assert svc["service_id"] == "cassandra-0"
    assert s.job_ad(svc["job_id"], "RemoteHost")["RemoteHost"].endswith("@node-b")
