"""Job descriptions rendered in process, no scheduler daemon: the directives that carry the spec
(cpus, memory with QEMU's overhead, scratch disk, walltime, the SIGTERM grace) per backend, like
dask-jobqueue's header tests; the shipped examples are fresh renders; client commands go through
the injected runner."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import htcondor2
import pytest

from cluster.errors import SchedulerError, SchedulerUnavailable
from cluster.spec import parse_spec
from submit import open_backend
from submit.base import QEMU_OVERHEAD_MB, JobResources
from submit.condor_check import validate_submit
from submit.render_examples import render_examples
from submit.runner import CommandResult, CommandRunner

WALLTIME = "1-02:03:04"
WALLTIME_S = 86400 + 2 * 3600 + 3 * 60 + 4
GRACE = 30 + 15  # hypervisor.stop_timeout + the wrapper's clean-up


def make_spec(tmp_path: Path, scheduler: str = "", wrapper: str = "/opt/salvus/bin/salvus-vmjob",
              store: Path | None = None):
    text = f"""
site: rt
store: '{store or tmp_path / 'store'}'
scheduler: {{wrapper: '{wrapper}', walltime: '{WALLTIME}', queue: vms, account: physics{scheduler}}}
hypervisor: {{stop_timeout: 30}}
roles:
  sage: {{image: sage@10.2, vcpus: 2, memory_mb: 1024, disk_mb: 4096, port: 6000}}
  hub: {{image: hub@3.1, port: 8080}}
  cassandra:
    image: cassandra@4.1
    port: 9042
    hosts: [hv0, hv1]
    persistent: [{{name: data, size_mb: 256, mount: /data}}]
"""
    return parse_spec(text, tmp_path / "cluster.yaml")


def lines(text: str) -> list[str]:
    return text.splitlines()


def test_resources_are_computed_once_from_the_spec(tmp_path):
    res = JobResources.of(make_spec(tmp_path), "sage")
    assert res == JobResources(cpus=2, memory_mb=1024 + QEMU_OVERHEAD_MB, disk_mb=4096, grace_s=GRACE,
                               walltime_s=WALLTIME_S)
    assert QEMU_OVERHEAD_MB == 256


def test_slurm_header_carries_the_spec(tmp_path):
    text = open_backend(make_spec(tmp_path), "slurm").render("sage")
    for directive in ("--job-name=rt.sage", "--cpus-per-task=2", f"--mem={1024 + 256}M", "--tmp=4096M",
                      f"--time={WALLTIME}", f"--signal=B:TERM@{GRACE + 60}", "--partition=vms",
                      "--account=physics", "--requeue"):
        assert f"#SBATCH {directive}" in lines(text), directive
    assert f"KillWait (SIGTERM -> SIGKILL) must be at least {GRACE}s" in text
    assert "service_id=${SALVUS_SERVICE_ID:-sage-${SLURM_JOB_ID}}" in lines(text)
    assert lines(text)[-1].endswith('--role sage --image sage@10.2 --service-id "$service_id"')


def test_pbs_header_carries_the_spec(tmp_path):
    text = open_backend(make_spec(tmp_path), "pbs").render("sage")
    for directive in ("-N rt.sage", "-l nodes=1:ppn=2", f"-l mem={1024 + 256}mb", "-l file=4096mb",
                      "-l walltime=26:03:04", "-q vms", "-A physics", "-r y"):
        assert f"#PBS {directive}" in lines(text), directive
    assert f"kill_delay = {GRACE}'" in text
    assert "service_id=${SALVUS_SERVICE_ID:-sage-${job_id%%.*}}" in lines(text)


def test_condor_submit_file_carries_the_spec(tmp_path):
    text = open_backend(make_spec(tmp_path), "condor").render("sage")
    assert validate_submit(text, "rendered") == []
    sub = htcondor2.Submit(text)
    assert sub["request_cpus"] == "2"
    assert sub["request_memory"] == str(1024 + 256)
    assert sub["request_disk"] == "4096M"
    assert sub["kill_sig"] == "SIGTERM" and sub["job_max_vacate_time"] == str(GRACE)
    assert sub["allowed_job_duration"] == str(WALLTIME_S)
    assert sub["accounting_group"] == "physics" and sub["MY.SalvusQueue"] == '"vms"'


def test_jobs_ask_for_the_feature_of_their_image_and_version(tmp_path):
    spec = make_spec(tmp_path)
    assert "#SBATCH --constraint=salvus_img_sage_v10_d2" in lines(open_backend(spec, "slurm").render("sage"))
    assert "#PBS -l proc=salvus_img_hub_v3_d1" in lines(open_backend(spec, "pbs").render("hub"))
    sub = htcondor2.Submit(open_backend(spec, "condor").render("sage"))
    assert sub["requirements"] == 'stringListMember("sage-10.2", TARGET.SalvusImages)'
    # A site where any host may pull at boot; a pinned role keeps its host.
    anywhere = make_spec(tmp_path, ", require_image: false")
    for scheduler in ("slurm", "pbs"):
        text = open_backend(anywhere, scheduler).render("sage")
        assert "salvus_img_" not in text and "--constraint" not in text and "proc=" not in text, scheduler
    condor = open_backend(anywhere, "condor")
    assert validate_submit(condor.render("sage"), "rendered") == []
    assert htcondor2.Submit(condor.render("sage"))["requirements"] == "true"
    assert htcondor2.Submit(condor.render("cassandra", "cassandra-1"))["requirements"] == 'TARGET.Machine == "hv1"'
    # A role booting its own image file: nothing imgdist advertises.
    own = parse_spec(f"store: {tmp_path}/s\nscheduler: {{backend: slurm}}\n"
                     f"roles: {{sage: {{image: sage@1, port: 6000, image_path: {tmp_path}/sage.qcow2}}}}\n",
                     tmp_path / "own.yaml")
    assert "--constraint" not in open_backend(own, "slurm").render("sage")
    assert htcondor2.Submit(open_backend(own, "condor").render("sage"))["requirements"] == "true"


def test_image_features_keep_every_name_and_version_apart():
    """Each NAME@VERSION has its own feature, of characters every Slurm and PBS parser keeps
    as they are, and it reads back as the same image."""
    import itertools

    from imagedist.classad import image_of_feature, slurm_feature

    parts = ["".join(p) for n in (1, 2, 3) for p in itertools.product("a1._+-v", repeat=n)]
    seen = {}
    for name, version in itertools.product(parts, ["1.0", "v", "_v", "1+b_2", "x.y-z"]):
        feature = slurm_feature(name, version)
        assert re.fullmatch(r"salvus_img_[A-Za-z0-9_-]+", feature), feature
        assert image_of_feature(feature) == (name, version)
        assert seen.setdefault(feature, (name, version)) == (name, version)
    assert len(seen) == len(parts) * 5
    assert slurm_feature("sage", "1.0") == "salvus_img_sage_v1_d0"
    assert image_of_feature("salvus_img_sage") is None and image_of_feature("gpu") is None


def test_drmaa_native_spec_carries_the_spec(tmp_path):
    backend = open_backend(make_spec(tmp_path), "drmaa")
    native = backend.job_template("sage", None)["native"].split()
    assert " ".join(native) == f"-r y -pe smp 2 -q vms -A physics -l h_rt={WALLTIME_S}"
    assert "-pe" not in backend.job_template("hub", None)["native"]  # one cpu: no parallel environment
    # Memory stays the site's own complex (h_vmem would count QEMU's whole virtual size).
    assert "h_vmem" not in backend.render("sage")
    words = shlex.split(backend.render("sage").splitlines()[1])
    assert words[:3] == ["qsub", "-N", "rt.sage"] and words[-6:] == ["--spec", str(tmp_path / "cluster.yaml"),
                                                                     "--role", "sage", "--image", "sage@10.2"]


@pytest.mark.parametrize("scheduler, pinned", [("slurm", "#SBATCH --nodelist=hv1"), ("pbs", "#PBS -l host=hv1"),
                                               ("condor", 'TARGET.Machine == "hv1"'), ("drmaa", "-l h=hv1")])
def test_persistent_role_is_pinned_to_its_disk_host_and_keeps_its_id(tmp_path, scheduler, pinned):
    text = open_backend(make_spec(tmp_path), scheduler).render("cassandra", "cassandra-1")
    assert pinned in text and "cassandra-1" in text
    if scheduler != "drmaa":  # a DRMAA template is never submitted by hand
        assert "cassandra-0" in open_backend(make_spec(tmp_path), scheduler).render("cassandra")


@pytest.mark.parametrize("scheduler", ["slurm", "pbs"])
def test_script_paths_survive_the_shell_and_are_overridable(tmp_path, scheduler):
    spec = make_spec(tmp_path / 'a dir "with" $quotes', wrapper='/opt/my tools/salvus-vmjob', store=tmp_path / "store")
    text = open_backend(spec, scheduler).render("sage")
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    tail = lines(text)[lines(text).index(next(ln for ln in lines(text) if ln.startswith("wrapper="))):]
    assert tail[-1].startswith("exec ")
    show = "job_id=7.srv\n" + "\n".join(tail[:-1]) + '\nprintf "%s\\n" ' + tail[-1][len("exec "):]
    env = {"SLURM_JOB_ID": "7", "PATH": "/usr/bin:/bin"}
    argv = subprocess.run(["bash", "-c", show], env=env, capture_output=True, text=True).stdout.splitlines()
    assert argv[:3] == ["/opt/my tools/salvus-vmjob", "--spec", spec.source]
    argv = subprocess.run(["bash", "-c", show], env={**env, "SALVUS_SPEC": "/x.yaml", "SALVUS_VMJOB": "/w"},
                          capture_output=True, text=True).stdout.splitlines()
    assert argv[:5] == ["/w", "--spec", "/x.yaml", "--role", "sage"] and argv[-1] == "sage-7"


def wrapper_argv(backend, role: str, service_id: str | None = None) -> list[str]:
    """The wrapper's argv as the job would run it: a script's tail run by bash, a submit
    description's arguments split as HTCondor's new syntax does, the DRMAA and local commands
    split as a shell would."""
    text = backend.render(role, service_id)
    if backend.name in ("slurm", "pbs"):
        tail = lines(text)[lines(text).index(next(ln for ln in lines(text) if ln.startswith("wrapper="))):]
        show = "job_id=7.srv\n" + "\n".join(tail[:-1]) + '\nprintf "%s\\n" ' + tail[-1][len("exec "):]
        return subprocess.run(["bash", "-c", show], env={"SLURM_JOB_ID": "7", "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, check=True).stdout.splitlines()
    if backend.name == "condor":
        args = htcondor2.Submit(text)["arguments"]
        assert args[0] == args[-1] == '"'
        return [w.replace("''", "'") for w in shlex.split(args[1:-1])]
    return shlex.split(lines(text)[-1].split("> ", 1)[-1])[1:] if backend.name == "local" else \
        shlex.split(lines(text)[1])


@pytest.mark.parametrize("scheduler", ["local", "slurm", "pbs", "condor", "drmaa"])
def test_every_job_names_its_image(tmp_path, scheduler):
    """The job contract: each backend's job passes the role's image as `--image NAME@VERSION`,
    fixed when it is rendered, so an edit of the spec later never changes a queued job."""
    for role, image in (("sage", "sage@10.2"), ("hub", "hub@3.1"), ("cassandra", "cassandra@4.1")):
        argv = wrapper_argv(open_backend(make_spec(tmp_path), scheduler), role)
        i = argv.index("--image")
        assert argv[i + 1] == image and argv[argv.index("--role") + 1] == role, (scheduler, argv)
    # A role booting its own file (demo, development) still names its image: the trust checks' name.
    own = parse_spec(f"store: {tmp_path}/s\nscheduler: {{wrapper: /w}}\n"
                     f"roles: {{sage: {{image: demo@7, port: 6000, image_path: {tmp_path}/demo-7.qcow2}}}}\n",
                     tmp_path / "own.yaml")
    argv = wrapper_argv(open_backend(own, scheduler), "sage")
    assert argv[argv.index("--image") + 1] == "demo@7"


@pytest.mark.parametrize("scheduler", ["local", "slurm", "pbs", "drmaa"])
def test_the_image_reaches_the_job_quoted(tmp_path, scheduler, monkeypatch):
    """The image is quoted as every other value is: even a value the spec would refuse (the
    wrapper refuses it too) stays one word and runs nothing."""
    from submit.base import Backend

    hostile = "x'$(touch INJECTED) ;y@1"
    monkeypatch.setattr(Backend, "job_image", lambda self, role: hostile)
    spec = make_spec(tmp_path, ", require_image: false")
    argv = wrapper_argv(open_backend(spec, scheduler), "sage")
    assert argv[argv.index("--image") + 1] == hostile
    assert not (Path.cwd() / "INJECTED").exists()


def test_local_executor_starts_the_wrapper_with_the_image(tmp_path, monkeypatch):
    """The local executor's own command line (no script): `--image` as submitted."""
    import submit.local

    started = []

    class FakePopen:
        def __init__(self, cmd, **kwargs):
            started.append(cmd)
            self.pid = os.getpid()

        def wait(self):
            return 0

    monkeypatch.setattr(submit.local.subprocess, "Popen", FakePopen)
    backend = open_backend(make_spec(tmp_path), "local")
    backend.log_dir().mkdir(parents=True)
    backend.dir.mkdir(parents=True)
    backend.submit_one("hub", None)
    [cmd] = started
    wrapper = cmd[cmd.index("--") + 1:]
    assert wrapper[:7] == ["/opt/salvus/bin/salvus-vmjob", "--spec", str(tmp_path / "cluster.yaml"),
                           "--role", "hub", "--image", "hub@3.1"]


def test_shipped_examples_are_fresh_renders():
    fresh = render_examples()
    assert len(fresh) == 9
    stale = [p.name for p, text in fresh.items() if not p.exists() or p.read_text() != text]
    assert stale == [], f"re-run scripts/render-examples: {stale} differ from a fresh render"


@pytest.mark.parametrize("path", sorted(p for p in render_examples() if p.suffix == ".sub"), ids=lambda p: p.name)
def test_shipped_submit_files_pass_the_condor_check(path):
    assert validate_submit(path.read_text(), path.name) == []


class FakeRunner(CommandRunner):
    """Answers like a scheduler without one: what a login-node runner would be swapped in as."""

    def __init__(self, answers: dict[str, CommandResult]) -> None:
        super().__init__()
        self.answers, self.calls = answers, []

    def run(self, argv, input=None, *, env=None, timeout=None):
        self.calls.append((list(argv), input, env))
        return self.answers[argv[0]]


def test_slurm_submits_through_the_injected_runner(tmp_path):
    spec = make_spec(tmp_path)
    runner = FakeRunner({"sbatch": CommandResult(["sbatch"], 0, "4242\n", ""),
                         "squeue": CommandResult(["squeue"], 0, "", "")})
    backend = open_backend(spec, "slurm", runner)
    jobs = backend.submit("sage", 2)
    assert [(j.job_id, j.service_id) for j in jobs] == [("4242", "sage-4242")] * 2
    argv, script, env = runner.calls[0]
    assert argv[:2] == ["sbatch", "--parsable"] and "#SBATCH --cpus-per-task=2" in script
    assert env["SALVUS_SPEC"] == spec.source and env["SALVUS_VMJOB"] == "/opt/salvus/bin/salvus-vmjob"
    assert f"--export={','.join(sorted(env))}" in argv  # these names and nothing else of ours
    assert backend.recorded_ids() == {"4242"}


def test_pbs_default_service_id_drops_the_server_name(tmp_path):
    runner = FakeRunner({"qsub": CommandResult(["qsub"], 0, "17.headnode\n", "")})
    jobs = open_backend(make_spec(tmp_path), "pbs", runner).submit("sage", 1)
    assert [(j.job_id, j.service_id) for j in jobs] == [("17.headnode", "sage-17")]


def test_a_rejected_or_unreachable_command_is_one_line(tmp_path):
    backend = open_backend(make_spec(tmp_path), "slurm", FakeRunner({
        "sbatch": CommandResult(["sbatch"], 1, "", "sbatch: error: Batch job submission failed: Invalid account\n"),
        "squeue": CommandResult(["squeue"], 1, "", "noise\nsqueue: error: Unable to contact slurm controller\n")}))
    with pytest.raises(SchedulerError, match=r"^sbatch failed \(exit 1\): sbatch: error: Batch job submission "
                                             r"failed: Invalid account$"):
        backend.submit("sage", 1)
    with pytest.raises(SchedulerUnavailable, match="^squeue: the slurm scheduler is unreachable: squeue: error:"):
        backend.list()
    assert backend.recorded_ids() == set()


def test_runner_takes_bare_programs_from_bin_dir_and_says_when_one_is_missing(tmp_path):
    (tmp_path / "hello").write_text("#!/bin/sh\necho \"hi $GREETING\"\n")
    (tmp_path / "hello").chmod(0o755)
    runner = CommandRunner(bin_dir=str(tmp_path))
    r = runner.run(["hello"], env={"GREETING": "there"})
    assert (r.argv, r.returncode, r.stdout) == ([str(tmp_path / "hello")], 0, "hi there\n")
    assert runner.program("/bin/true") == "/bin/true"
    with pytest.raises(SchedulerUnavailable, match=f"^{tmp_path}/squeue: command not found"):
        runner.run(["squeue"])
    with pytest.raises(SchedulerUnavailable, match=r"^/bin/sleep: no answer within 0s"):
        runner.run(["/bin/sleep", "5"], timeout=0.2)
