"""Submitting from a workstation (`scheduler.login`): a real OpenSSH server (tests/fixtures/sshd.py)
in front of the test Slurm cluster; every scheduler command runs over one connection per command
line, its `SLURM_CONF` reaching the commands only through `login.env`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.errors import EXIT_CONFIG, EXIT_TEMPFAIL, SpecError
from cluster.spec import load_spec
from cluster.ssh import LoginRefused, SshUnavailable
from cluster.store import Store
from submit import open_backend
from submit.runner import SshRunner
from submit.slurm import SlurmBackend, parse_squeue
from tests.fixtures._daemons import free_port
from tests.test_submit_slurm import TORQUE_BIN
from tests.fixtures.sshd import keygen
from tests.polling import wait_for
from tests.test_submit_slurm import live, logs_of
from tests.submit_support import scheduler_spec, stop_everything_after  # noqa: F401 (fixture)


VMJOB = Path(sys.executable).parent / "salvus-vmjob"  # as the login node's jobs find it


def login_yaml(server, **over) -> str:
    fields = {"host": "127.0.0.1", "user": "root", "port": server.port,
              "key_file": str(server.client_key), "known_hosts": str(server.known_hosts), **over}
    return f", wrapper: {VMJOB}, login: " + json.dumps(fields)


def login_spec(tmp_path: Path, demo_image, server, slurm_conf: str | None = None,
               directives: str = "--begin=now+3600", **over) -> Path:
    """A slurm spec submitting through `server`; by default its jobs cannot start for an hour (the
    queue holds them pending: no VM boots)."""
    if slurm_conf:
        over.setdefault("env", {"SLURM_CONF": slurm_conf, **login_node_python()})
    extra = f', extra_directives: ["{directives}"]' if directives else ""
    return scheduler_spec(tmp_path, demo_image, "slurm", extra + login_yaml(server, **over))


def login_node_python() -> dict[str, str]:
    """The login node (and the jobs it submits, by sbatch --export=ALL) runs the code under test,
    as a cluster runs the release its workstations have: the same PYTHONPATH as these tests."""
    return {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}


def runner_of(tmp_path: Path, server, **over) -> SshRunner:
    spec = tmp_path / "cluster.yaml"
    spec.write_text("scheduler: {backend: slurm" + login_yaml(server, **over) + "}\n"
                    "roles: {sage: {image: demo@1, port: 8080}}\n")
    return SshRunner.for_spec(load_spec(spec))


def test_commands_and_files_go_over_one_connection_with_the_login_environment(tmp_path, sshd_server):
    runner = runner_of(tmp_path, sshd_server, env={"GREETING": "it's $HOME"},
                       profile="export FROM_PROFILE=yes")
    before = sshd_server.connections()
    r = runner.run(["sh", "-c", 'printf "%s|%s|%s|%s" "$GREETING" "$FROM_PROFILE" "$1" "$EXTRA"; cat; exit 3',
                    "sh", "a b;c"], input="stdin text", env={"EXTRA": "x"})
    assert (r.returncode, r.stdout) == (3, "it's $HOME|yes|a b;c|xstdin text")
    target = tmp_path / "cluster-store" / "state" / "scripts" / "job.sh"
    runner.write_file(target, "#!/bin/sh\necho hi\n", mode=0o755)
    assert target.read_text() == "#!/bin/sh\necho hi\n" and target.stat().st_mode & 0o777 == 0o755
    assert [p.name for p in target.parent.iterdir()] == ["job.sh"]  # no temporary left behind
    assert runner.run(["true"]).returncode == 0
    assert sshd_server.connections() - before == 1


def test_this_machines_own_environment_is_not_forced_on_the_login_node(tmp_path, sshd_server, monkeypatch):
    monkeypatch.setenv("SALVUS_TEST_WORKSTATION", "mine")
    runner = runner_of(tmp_path, sshd_server)
    show = ["sh", "-c", 'printf "%s" "${SALVUS_TEST_WORKSTATION-unset}"']
    assert runner.run(show, env={"SALVUS_TEST_WORKSTATION": "mine"}).stdout == "unset"
    assert runner.run(show, env={"SALVUS_TEST_WORKSTATION": "set"}).stdout == "set"


def test_unknown_or_changed_host_key_is_refused_naming_its_fingerprint(tmp_path, sshd_server):
    fp = sshd_server.fingerprint()
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(LoginRefused) as e:
        runner_of(tmp_path, sshd_server, known_hosts=str(empty)).run(["true"])
    assert fp in str(e.value) and "not in" in str(e.value) and "\n" not in str(e.value)
    assert not empty.read_text()  # never learned

    keygen(tmp_path / "other")
    other = (tmp_path / "other.pub").read_text().split()
    changed = tmp_path / "changed_known_hosts"
    changed.write_text(f"[127.0.0.1]:{sshd_server.port} {other[0]} {other[1]}\n")
    with pytest.raises(LoginRefused) as e:
        runner_of(tmp_path, sshd_server, known_hosts=str(changed)).run(["true"])
    assert fp in str(e.value) and "does not match" in str(e.value)
    assert e.value.exit_code == EXIT_CONFIG


def test_auth_failure_is_78_and_unreachable_is_75(tmp_path, sshd_server, demo_image, cli):
    keygen(tmp_path / "stranger")
    spec = login_spec(tmp_path, demo_image, sshd_server, key_file=str(tmp_path / "stranger"))
    r = cli("--spec", str(spec), "status")
    assert r.returncode == EXIT_CONFIG and "authentication failed" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr

    with pytest.raises(SshUnavailable) as e:
        runner_of(tmp_path, sshd_server, port=free_port()).run(["true"])
    assert e.value.exit_code == EXIT_TEMPFAIL and "cannot connect" in str(e.value)


def test_login_with_drmaa_or_condor_is_refused_in_one_line(tmp_path):
    for backend, why in (("drmaa", "DRMAA needs its library on the submitting host"),
                         ("condor", "scheduler.schedd")):
        spec = tmp_path / f"{backend}.yaml"
        spec.write_text(f"scheduler: {{backend: {backend}, wrapper: /x, login: {{host: login.example}}}}\n"
                        "roles: {sage: {image: demo@1, port: 8080}}\n")
        with pytest.raises(SpecError) as e:
            load_spec(spec)
        assert "scheduler.login" in str(e.value) or "scheduler" in str(e.value)
        assert why in str(e.value) and "\n" not in str(e.value)


def test_login_needs_the_wrapper_path_on_the_cluster(tmp_path):
    spec = tmp_path / "cluster.yaml"
    spec.write_text("scheduler: {backend: slurm, login: {host: login.example}}\n"
                    "roles: {sage: {image: demo@1, port: 8080}}\n")
    with pytest.raises(SpecError, match="salvus-vmjob on the execute nodes"):
        load_spec(spec)


def test_squeue_comment_carries_service_id_and_token(tmp_path):
    spec = tmp_path / "cluster.yaml"
    spec.write_text("site: s\nscheduler: {backend: slurm}\nroles: {sage: {image: demo@1, port: 8080}}\n")
    backend = SlurmBackend(load_spec(spec))
    jobs = parse_squeue("12|s.sage|PENDING|None|2026-01-01T00:00:00|N/A|UNLIMITED|salvus::abc123\n"
                        "13|s.sage|PENDING|None|2026-01-01T00:00:00|N/A|UNLIMITED|salvus:sage-0:def456\n"
                        "14|s.sage|PENDING|None|2026-01-01T00:00:00|N/A|UNLIMITED|salvus:sage-1\n", backend)
    assert [(j.service_id, j.token) for j in jobs] == [("sage-12", "abc123"), ("sage-0", "def456"),
                                                       ("sage-1", "")]


@pytest.mark.slurm
@pytest.mark.vm
def test_scale_status_stop_from_a_workstation_one_connection_each(tmp_path, demo_image, sshd_server,
                                                                  slurm_cluster, stop_everything_after, cli):
    spec = login_spec(tmp_path, demo_image, sshd_server, slurm_conf=str(slurm_cluster.conf), directives="")
    stop_everything_after(spec)
    # The workstation has no Slurm configuration: only the login node's environment names it.
    env = {"SLURM_CONF": "/nonexistent/slurm.conf"}

    def run(*argv: str, connections: int = 1) -> subprocess.CompletedProcess:
        before = sshd_server.connections()
        r = cli("--spec", str(spec), *argv, env=env, timeout=150)
        assert r.returncode == 0, r.stderr
        assert sshd_server.connections() - before == connections, \
            f"{argv}: {sshd_server.log.read_text()[-2000:]}"
        return r

    r = run("scale", "sage=2")
    assert r.stdout.count("submitted slurm job") == 2, r.stdout
    # The jobs Slurm started from the login node's submission boot and register their VMs.
    try:
        wait_for(lambda: len(live(spec, "sage")) == 2, 240, "2 sage registered")
    except AssertionError:
        raise AssertionError(logs_of(spec)) from None
    st = json.loads(run("status", "--json").stdout)
    assert st["roles"]["sage"]["running"] == 2 and st["roles"]["sage"]["registered"] == 2, st
    jobs = sorted(j["job_id"] for j in st["jobs"])
    assert "nothing to do" in run("scale", "sage=2").stdout
    assert run("render", "sage", connections=0).stdout.startswith("#!")  # runs nothing
    r = run("stop", "--all")
    assert sorted(r.stdout.split(":", 1)[1].split()) == jobs, r.stdout
    assert live(spec, "sage") == {}
    states = slurm_cluster.run("squeue", "-h", "-t", "all", "-j", ",".join(jobs), "-o", "%T").stdout.split()
    assert set(states) <= {"CANCELLED", "COMPLETED"}, states


@pytest.mark.slurm
def test_connection_dropped_after_sbatch_accepted_the_job_is_adopted_not_resubmitted(
        tmp_path, demo_image, sshd_server, slurm_cluster, stop_everything_after, cli):
    # On the login node, sbatch is a wrapper that really submits (held: no VM boots), says so in
    # a file, then stalls before printing the id: the window in which the test drops the connection.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sbatch").write_text(f"""#!/bin/sh
out=$(/usr/bin/sbatch --hold "$@") || exit $?
echo "$out" >> {tmp_path}/accepted
sleep 120
echo "$out"
""")
    (shim / "sbatch").chmod(0o755)
    spec = login_spec(tmp_path, demo_image, sshd_server, directives="",
                      env={"SLURM_CONF": str(slurm_cluster.conf), "PATH": f"{shim}:/usr/bin:/bin",
                           **login_node_python()})
    stop_everything_after(spec)
    exe = Path(sys.executable).parent / "salvus_jobs"
    proc = subprocess.Popen([str(exe), "--spec", str(spec), "scale", "sage=1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "SLURM_CONF": "/nonexistent"})
    try:
        wait_for(lambda: (tmp_path / "accepted").exists(), 60, "sbatch accepted the job")
        sshd_server.drop_sessions()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    job_id = (tmp_path / "accepted").read_text().strip()
    assert proc.returncode == EXIT_TEMPFAIL, out + err
    assert "connection lost while running" in err and len(err.strip().splitlines()) == 1, err
    backend = open_backend(load_spec(spec))
    assert backend.recorded_ids() == set()  # the id was never read...
    assert len(backend.ledger.intents()) == 1  # ...but the submission is on record

    r = cli("--spec", str(spec), "scale", "sage=1")
    assert r.returncode == 0, r.stderr
    assert "nothing to do" in r.stdout and f"held {job_id}" in r.stdout, r.stdout
    assert (tmp_path / "accepted").read_text().strip() == job_id  # sbatch ran once
    assert backend.recorded_ids() == {job_id} and backend.ledger.intents() == []
    listed = slurm_cluster.run("squeue", "-h", "-t", "all", "-n", backend.job_name("sage"), "-o", "%i").stdout.split()
    assert listed == [job_id]


@pytest.mark.slurm
def test_pbs_script_goes_up_by_sftp_and_qsub_runs_on_the_login_node(tmp_path, demo_image, sshd_server,
                                                                    slurm_cluster, stop_everything_after, cli):
    spec = scheduler_spec(tmp_path, demo_image, "pbs", f', bin_dir: {TORQUE_BIN}, extra_directives: ["-h"]'
                          + login_yaml(sshd_server, env={"SLURM_CONF": str(slurm_cluster.conf),
                                                         **login_node_python()}))
    stop_everything_after(spec)
    # Slurm's qstat wrapper fails (exit 153) on an empty queue: keep one foreign job in it.
    other = slurm_cluster.run("sbatch", "--parsable", "--hold", "-J", "placeholder", "--wrap", "true").stdout.strip()
    try:
        before = sshd_server.connections()
        r = cli("--spec", str(spec), "scale", "sage=1", env={"SLURM_CONF": "/nonexistent"})
        assert r.returncode == 0, r.stderr
        assert sshd_server.connections() - before == 1
        scripts = list(Store.of(load_spec(spec)).runtime.scripts_dir.iterdir())
        assert [p.suffix for p in scripts] == [".pbs"] and scripts[0].stat().st_mode & 0o777 == 0o755
        st = json.loads(cli("--spec", str(spec), "status", "--json", env={"SLURM_CONF": "/nonexistent"}).stdout)
        assert st["roles"]["sage"]["held"] + st["roles"]["sage"]["queued"] == 1, st
        assert cli("--spec", str(spec), "stop", "--all", env={"SLURM_CONF": "/nonexistent"}).returncode == 0
    finally:
        slurm_cluster.run("scancel", other)
