"""Spec values cannot inject into job scripts, submit descriptions or authorized_keys: every
scheduler string is one line, names are plain words, the walltime is parsed, shell values are
quoted and run through a real bash, HTCondor keys are fixed. All in process, no scheduler daemon."""
from __future__ import annotations

import subprocess
from pathlib import Path

import htcondor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cluster.errors import SpecError
from cluster.spec import parse_spec, parse_walltime
from jobwrappers.configdrive import GuestConfig, build_config_drive
from submit import open_backend
from submit.condor_check import validate_submit

ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOr5a3bPpvs0sh8Q7dS8f3bA6Z+vKkIY3m5x0V8xY0cC ops@site"
ROLES = "roles:\n  sage: {image: sage@1, port: 6000}\n  db: {image: db@1, port: 9042, persistent: [{name: data, size_mb: 1}]}\n"


def spec_text(tmp_path: Path, scheduler: str = "", top: str = "") -> str:
    return (f"store: {tmp_path / 'store'}\n{top}"
            f"scheduler: {{wrapper: /opt/salvus/bin/salvus-vmjob{scheduler}}}\n" + ROLES)


def refused(text: str, path: Path, *parts: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(text, path)
    msg = str(info.value)
    assert "\n" not in msg and (str(path) in msg or repr(str(path)) in msg), msg
    for part in parts:
        assert part in msg, msg


def run_script_tail(text: str, env: dict[str, str] | None = None) -> list[str]:
    """Runs the job script with `exec` replaced by printf: the argv the wrapper would get."""
    script = text.replace('\nexec "$wrapper"', '\nprintf "%s\\n" "$wrapper"')
    r = subprocess.run(["bash", "-c", script], env={"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "7", **(env or {})},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


# --- the spec refuses what would break out of a line, a word or the store --------------------------

@pytest.mark.parametrize("scheduler,top,field", [
    (', queue: "vms\\necho INJECTED"', "", "scheduler.queue"),
    (', queue: "$(touch /tmp/x)"', "", "scheduler.queue"),
    (", queue: vms and more", "", "scheduler.queue"),
    (', account: "x\\nexecutable = /bin/sh"', "", "scheduler.account"),
    (', walltime: "1:00\\necho INJECTED"', "", "scheduler.walltime: expected a Slurm time"),
    (', walltime: "$(reboot)"', "", "scheduler.walltime: expected a Slurm time"),
    (', walltime: "1-25:00:00"', "", "hours after 'D-' must be below 24"),
    (', walltime: "10:75"', "", "minutes and seconds must be below 60"),
    (', walltime: "0"', "", "above zero"),
    (', extra_directives: ["--qos=x\\necho INJECTED"]', "", "scheduler.extra_directives[0]: expected a single line"),
    (', log_dir: "/l\\rx"', "", "scheduler.log_dir: expected a single line"),
    (', bin_dir: "/w\\n/bin/sh"', "", "scheduler.bin_dir: expected a single line"),
    ("", "site: ../../../tmp/evil\n", "site: expected a short lowercase name"),
    ("", "site: \"salvus\\nrm -rf /\"\n", "site: expected a short lowercase name"),
    ("", "ssh_keys: [\"" + ED25519 + "\\ncommand=\\\"/bin/sh\\\" " + ED25519 + "\"]\n", "ssh_keys[0]: expected one OpenSSH"),
    ("", "ssh_keys: ['command=\"/bin/sh\" " + ED25519 + "']\n", "ssh_keys[0]: expected one OpenSSH"),
    ("", "ssh_keys: ['ssh-ed25519 AAAAC3NzaC1yc2EAAAADAQABAAAAgQ== x']\n", "not a ssh-ed25519 key"),
    ("", "ssh_keys: ['ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOr5a3bP x']\n", "malformed"),
])
def test_spec_refuses_values_that_would_inject(tmp_path, scheduler, top, field):
    refused(spec_text(tmp_path, scheduler, top), tmp_path / "cluster.yaml", field)


def test_role_hosts_are_plain_host_names(tmp_path):
    text = spec_text(tmp_path).replace("port: 9042,", "port: 9042, hosts: ['hv0 --export=ALL'],")
    refused(text, tmp_path / "cluster.yaml", "roles.db.hosts[0]: expected a scheduler name")


def test_spec_path_with_a_newline_refused(tmp_path):
    d = tmp_path / "evil\ntouch INJECTED"
    d.mkdir()
    refused(spec_text(tmp_path), d / "cluster.yaml", "the spec's path must be a single line")


def test_openssh_keys_of_each_kind_accepted(tmp_path):
    ecdsa = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    spec = parse_spec(spec_text(tmp_path, top=f"ssh_keys: ['{ED25519}', '{ecdsa}', '{ecdsa} a comment with spaces']\n"),
                      tmp_path / "cluster.yaml")
    assert spec.ssh_keys[0] == ED25519 and len(spec.ssh_keys) == 3


def test_config_drive_refuses_a_multi_line_key(tmp_path):
    cfg = GuestConfig("sage-1", "sage", "sage-1", 6000, "i-1", ssh_keys=[ED25519 + "\ncommand=\"/bin/sh\" " + ED25519])
    with pytest.raises(SpecError, match=r"ssh_keys\[0\]: expected one OpenSSH public key line"):
        build_config_drive(tmp_path / "cidata.iso", cfg)
    assert not (tmp_path / "cidata.iso").exists()


# --- walltime: parsed once, each backend's own form -------------------------------------------------

@pytest.mark.parametrize("text,seconds", [("90", 5400), ("05:30", 330), ("26:03:04", 93784), ("7-00:00:00", 604800),
                                          ("1-02", 93600), ("1-02:03", 93780), ("1-02:03:04", 93784)])
def test_walltime_forms(text, seconds):
    assert parse_walltime(text) == seconds


def test_each_backend_renders_its_own_walltime_form(tmp_path):
    spec = parse_spec(spec_text(tmp_path, ', walltime: "1-02:03:04"'), tmp_path / "cluster.yaml")
    assert "#SBATCH --time=1-02:03:04" in open_backend(spec, "slurm").render("sage").splitlines()
    assert "#PBS -l walltime=26:03:04" in open_backend(spec, "pbs").render("sage").splitlines()
    assert htcondor2.Submit(open_backend(spec, "condor").render("sage"))["allowed_job_duration"] == "93784"
    assert "-l h_rt=93784" in open_backend(spec, "drmaa").render("sage")
    spec = parse_spec(spec_text(tmp_path, ', walltime: "90"'), tmp_path / "cluster.yaml")
    assert "#SBATCH --time=01:30:00" in open_backend(spec, "slurm").render("sage").splitlines()


# --- the rendered job text ------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ["slurm", "pbs"])
def test_spec_path_reaches_the_script_quoted(tmp_path, scheduler):
    d = tmp_path / "it's $(touch INJECTED) `touch INJECTED` \"x\""
    d.mkdir()
    spec = parse_spec(spec_text(tmp_path), d / "cluster.yaml")
    text = open_backend(spec, scheduler).render("sage")
    argv = run_script_tail(text, {"PBS_JOBID": "7.srv"})
    assert argv[:5] == ["/opt/salvus/bin/salvus-vmjob", "--spec", str(d / "cluster.yaml"), "--role", "sage"]
    assert argv[-1] == "sage-7"
    assert not list(tmp_path.rglob("INJECTED")) and not Path("INJECTED").exists()


@pytest.mark.parametrize("scheduler", ["slurm", "pbs", "condor", "drmaa"])
@pytest.mark.parametrize("sid", ["x$(touch INJECTED)", "a b", "sage-1\n", "../x"])
def test_render_refuses_a_bad_service_id(tmp_path, scheduler, sid):
    spec = parse_spec(spec_text(tmp_path), tmp_path / "cluster.yaml")
    with pytest.raises(SpecError, match="--service-id: expected letters, digits"):
        open_backend(spec, scheduler).render("sage", sid)


def test_render_cli_refuses_a_bad_service_id(tmp_path, cli):
    path = tmp_path / "cluster.yaml"
    path.write_text(spec_text(tmp_path))
    r = cli("--spec", str(path), "render", "sage", "--scheduler", "slurm", "--service-id", "x$(touch INJECTED)")
    assert r.returncode == 78 and "--service-id: expected letters, digits" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""


@pytest.mark.parametrize("scheduler,directive,problem", [
    ("slurm", "echo INJECTED", "expected a '#SBATCH ...' line or a '-option'"),
    ("slurm", "#PBS -l mem=1gb", "expected a '#SBATCH ...' line or a '-option'"),
    ("pbs", "touch INJECTED", "expected a '#PBS ...' line or a '-option'"),
    ("condor", "executable = /bin/sh", "executable is set by salvus"),
    ("condor", "+SalvusRole = \"hub\"", "my.salvusrole is set by salvus"),
    ("condor", "include command : touch INJECTED", "expected one 'command = value' line"),
])
def test_extra_directives_must_be_directives(tmp_path, scheduler, directive, problem):
    spec = parse_spec(spec_text(tmp_path, f", extra_directives: ['{directive}']"), tmp_path / "cluster.yaml")
    with pytest.raises(SpecError, match="scheduler.extra_directives\\[0\\]: ") as info:
        open_backend(spec, scheduler).render("sage")
    assert problem in str(info.value)


def test_extra_directives_that_are_directives_are_kept(tmp_path):
    spec = parse_spec(spec_text(tmp_path, ", extra_directives: ['--qos=long', '#SBATCH --exclusive']"),
                      tmp_path / "cluster.yaml")
    text = open_backend(spec, "slurm").render("sage").splitlines()
    assert "#SBATCH --qos=long" in text and "#SBATCH --exclusive" in text
    spec = parse_spec(spec_text(tmp_path, ", extra_directives: ['+Project = \"physics\"']"), tmp_path / "cluster.yaml")
    text = open_backend(spec, "condor").render("sage")
    assert validate_submit(text, "x.sub") == [] and htcondor2.Submit(text)["MY.Project"] == '"physics"'


def test_log_dir_with_spaces_is_refused_where_it_would_be_a_directive(tmp_path):
    spec = parse_spec(spec_text(tmp_path, ", log_dir: '/var/log/my jobs'"), tmp_path / "cluster.yaml")
    with pytest.raises(SpecError, match="log_dir '/var/log/my jobs' cannot go into a #SBATCH line"):
        open_backend(spec, "slurm").render("sage")


def test_condor_values_are_quoted_and_keys_fixed(tmp_path):
    d = tmp_path / "with space"
    d.mkdir()
    spec = parse_spec(spec_text(tmp_path, ", queue: vms, account: group_physics"), d / "cluster.yaml")
    text = open_backend(spec, "condor").render("sage")
    assert validate_submit(text, "x.sub") == []
    sub = htcondor2.Submit(text)
    assert sub["accounting_group"] == "group_physics" and sub["MY.SalvusQueue"] == '"vms"'
    assert sub.expand("arguments").startswith(f"\"--spec '{d / 'cluster.yaml'}' --role sage")
    d = tmp_path / "it's"
    d.mkdir()
    spec = parse_spec(spec_text(tmp_path), d / "cluster.yaml")
    with pytest.raises(SpecError, match="cannot go into an HTCondor submit description"):
        open_backend(spec, "condor").render("sage")


def test_validate_submit_catches_a_redefined_executable(tmp_path):
    spec = parse_spec(spec_text(tmp_path), tmp_path / "cluster.yaml")
    text = open_backend(spec, "condor").render("sage")
    bad = text.replace("queue 1\n", "accounting_group = x\nexecutable = /bin/sh\nqueue 1\n")
    htcondor2.Submit(bad)  # the bindings take it: the last executable wins
    problems = validate_submit(bad, "x.sub")
    first = next(n for n, line in enumerate(bad.splitlines(), 1) if line.startswith("executable "))
    assert any(f"executable is set again (first on line {first})" in p for p in problems), problems
    bad = text.replace("queue 1\n", "+salvusrole = \"hub\"\nqueue 1\n")
    assert any("my.salvusrole is set again" in p for p in validate_submit(bad, "x.sub"))
