"""HTCondor: no schedd can run here (no daemons in Debian, the PyPI wheel is bindings only), so the
shipped and rendered submit files are validated offline with htcondor2.Submit + classad2 + our
check of command names; the schedd code path is the documented htcondor2 API, and the tests that
need a schedd are skipped with that reason in their names."""
from __future__ import annotations

from pathlib import Path

import htcondor2
import pytest

from cluster.spec import load_spec
from submit import open_backend
from submit.condor_check import DOCUMENTED_COMMANDS, validate_submit, validate_submit_file
from tests.submit_support import scheduler_spec

EXAMPLES = Path(__file__).resolve().parent.parent / "submit" / "examples"


@pytest.mark.parametrize("name", ["sage_vm.sub", "hub_vm.sub", "cassandra_vm.sub"])
def test_shipped_submit_file_is_valid(name):
    path = EXAMPLES / name
    assert validate_submit_file(path) == []
    sub = htcondor2.Submit(path.read_text())
    role = name.split("_")[0]
    assert sub["MY.SalvusRole"] == f'"{role}"'
    assert sub.expand("executable") == "/usr/local/bin/salvus-vmjob"
    args = sub.expand("arguments")
    assert f"--spec '/etc/salvus/cluster.yaml' --role {role}" in args
    assert sub["kill_sig"] == "SIGTERM" and int(sub["job_max_vacate_time"]) >= 35
    assert sub["on_exit_hold"] == "ExitCode =?= 65 || ExitCode =?= 78"
    assert sub["retry_until"] == "ExitCode =!= 75"
    assert "stringListMember(" in sub["requirements"] and "TARGET.SalvusImages" in sub["requirements"]
    if role == "cassandra":
        assert "--service-id cassandra-0" in args  # a stable id: the job finds its persistent disk


def test_rendered_submit_file_matches_the_spec(tmp_path, demo_image, cli):
    spec = scheduler_spec(tmp_path, demo_image, "condor", extra=', requirements: "TARGET.HasKVM =?= true"')
    r = cli("--spec", str(spec), "render", "cassandra", "--service-id", "cassandra-1")
    assert r.returncode == 0, r.stderr
    assert validate_submit(r.stdout, "rendered") == []
    sub = htcondor2.Submit(r.stdout)
    assert sub["request_cpus"] == "1" and sub["request_memory"] == str(128 + 256)
    assert sub["request_disk"] == "2048M"
    assert sub["MY.SalvusServiceId"] == '"cassandra-1"'
    assert sub.expand("arguments").endswith("--role cassandra --image demo@1 --service-id cassandra-1\"")
    # The demo role boots its own image_path, which no host advertises: only the site's requirement.
    assert sub["requirements"] == "(TARGET.HasKVM =?= true)"
    assert Path(sub.expand("executable")).name == "salvus-vmjob"
    assert sub.expand("arguments").startswith(f'"--spec \'{load_spec(spec).source}\' ')


@pytest.mark.parametrize("mutate, problem", [
    (lambda t: t.replace("request_cpus ", "request_cpu "), "request_cpu: not a documented submit command"),
    (lambda t: t.replace("kill_sig ", "kill_signal "), "kill_signal: not a documented submit command"),
    (lambda t: t.replace("ExitCode =?= 78", "ExitCode =?= "), "on_exit_hold: not a valid ClassAd expression"),
    (lambda t: t.replace('+SalvusRole             = "sage"', "+SalvusRole = sage ("), "MY.SalvusRole: not a valid ClassAd expression"),
    (lambda t: t + "queue 1\n", "expected exactly one 'queue' statement, found 2"),
    (lambda t: t.replace("queue 1\n", "queue 1\nrequest_memory = 9\n"), "commands after 'queue' are ignored"),
    (lambda t: t.replace("executable              = $(SALVUS_VMJOB)\n", ""), "executable: required command is missing"),
    (lambda t: t.replace("endif\n", "", 1), "'if' without 'endif'"),
])
def test_validator_catches_what_the_bindings_accept(mutate, problem):
    text = mutate((EXAMPLES / "sage_vm.sub").read_text())
    htcondor2.Submit(text)  # the bindings themselves raise nothing for any of these
    problems = validate_submit(text, "sage_vm.sub")
    assert any(problem in p for p in problems), problems


def test_documented_command_set_holds_every_command_we_render():
    text = (EXAMPLES / "sage_vm.sub").read_text()
    used = {k.lower() for k in htcondor2.Submit(text).keys() if not k.startswith("MY.")}
    assert used - {"salvus_vmjob", "salvus_spec"} <= DOCUMENTED_COMMANDS


def test_condor_without_a_schedd_is_one_line(tmp_path, demo_image, cli):
    spec = scheduler_spec(tmp_path, demo_image, "condor")
    # A machine with no HTCondor configuration at all (not the session pool's, if it is up).
    (tmp_path / "condor_config").write_text("COLLECTOR_HOST = 127.0.0.1:1\n")
    r = cli("--spec", str(spec), "scale", "sage=1", env={"CONDOR_CONFIG": str(tmp_path / "condor_config")})
    assert r.returncode == 75
    assert r.stderr.startswith("salvus_jobs: condor: cannot reach the local schedd: ") and r.stderr.count("\n") == 1
    assert open_backend(load_spec(spec)).ledger.jobs() == []
