"""A job sees the allowlisted part of the submitter's environment only (submit/base.py
JOB_ENV_NAMES): a secret there (SALVUS_KEY_PASSPHRASE) never reaches a job, whichever backend
queued it. The "wrapper" here is a script that records its environment."""
from __future__ import annotations

from pathlib import Path

import htcondor2
import pytest

from cluster.spec import load_spec
from submit import open_backend
from submit.condor_check import validate_submit
from tests.polling import wait_for
from tests.test_submit_slurm import TORQUE_BIN

SECRETS = {"SALVUS_KEY_PASSPHRASE": "hunter2-passphrase", "AWS_SECRET_ACCESS_KEY": "hunter2-aws"}


def env_dump_spec(tmp_path: Path, backend: str, extra: str = "") -> tuple[Path, Path]:
    """A spec whose wrapper writes its environment (NUL-separated) to a file in `out` and exits 0."""
    out = tmp_path / "env"
    out.mkdir()
    wrapper = tmp_path / "dump-env"
    wrapper.write_text(f"#!/bin/sh\nenv -0 > '{out}/'$$.env.tmp && mv '{out}/'$$.env.tmp '{out}/'$$.env\n")
    wrapper.chmod(0o755)
    spec = tmp_path / "cluster.yaml"
    spec.write_text(f"site: env{backend}{tmp_path.name[-6:].replace('_', '')}\nstore: {tmp_path}/store\n"
                    f"scheduler: {{backend: {backend}, wrapper: {wrapper}{extra}}}\n"
                    "roles: {sage: {image: demo@1, port: 6000}}\n")
    return spec, out


def job_environ(out: Path, timeout: float = 90) -> dict[str, str]:
    dump = wait_for(lambda: next(iter(out.glob("*.env")), None), timeout, "the job's environment")
    return dict(item.split("=", 1) for item in dump.read_text().split("\0") if "=" in item)


def submit_with_secrets(cli, spec: Path) -> None:
    # A stale SALVUS_SERVICE_ID of the submitter's would give the job another service's id.
    r = cli("--spec", str(spec), "scale", "sage=1", env={**SECRETS, "LC_TIME": "C", "SALVUS_SERVICE_ID": "sage-99"})
    assert r.returncode == 0, r.stderr


def assert_allowlisted(env: dict[str, str], spec: Path) -> None:
    assert not set(SECRETS) & set(env), sorted(env)
    assert not any(v in SECRETS.values() for v in env.values())
    assert env["SALVUS_SPEC"] == str(spec) and env["LC_TIME"] == "C" and env["PATH"]
    assert env.get("SALVUS_SERVICE_ID") != "sage-99"


def test_local_job_gets_the_allowlisted_environment_only(tmp_path, cli):
    spec, out = env_dump_spec(tmp_path, "local")
    submit_with_secrets(cli, spec)
    env = job_environ(out)
    assert_allowlisted(env, spec)
    assert env["SALVUS_SCHEDULER"] == "local" and env["SALVUS_LOCAL_JOB_ID"]


@pytest.mark.slurm
def test_slurm_job_gets_the_allowlisted_environment_only(tmp_path, slurm_cluster, cli):
    spec, out = env_dump_spec(tmp_path, "slurm", extra=", require_image: false")  # no host holds demo@1
    submit_with_secrets(cli, spec)
    env = job_environ(out)
    assert_allowlisted(env, spec)
    assert env["SLURM_JOB_ID"] and env["SALVUS_SCHEDULER"] == "slurm"


@pytest.mark.slurm
def test_pbs_job_gets_the_allowlisted_environment_only(tmp_path, slurm_cluster, cli):
    spec, out = env_dump_spec(tmp_path, "pbs", extra=f", bin_dir: {TORQUE_BIN}, require_image: false")
    submit_with_secrets(cli, spec)
    env = job_environ(out)
    assert_allowlisted(env, spec)
    assert env["SALVUS_SCHEDULER"] == "pbs"


@pytest.mark.sge
def test_drmaa_job_gets_the_allowlisted_environment_only(tmp_path, gridengine, cli):
    spec, out = env_dump_spec(tmp_path, "drmaa")
    submit_with_secrets(cli, spec)
    env = job_environ(out, timeout=120)
    assert_allowlisted(env, spec)
    assert env["JOB_ID"] and env["SALVUS_SCHEDULER"] == "drmaa"


def test_condor_job_does_not_copy_the_submitters_environment(tmp_path):
    # No schedd runs here (tests/test_condor_submit.py): the submit description says it.
    spec, _ = env_dump_spec(tmp_path, "condor")
    text = open_backend(load_spec(spec)).render("sage")
    assert validate_submit(text, "sage.sub") == []
    assert htcondor2.Submit(text)["getenv"] == "false"
