"""Only our jobs count, on every scheduler: another user's jobs with this site's job names and a
`salvus:` comment are never counted, shown or cancelled (`scheduler.submit_user`, Backend.list).
The real Slurm of the fixture, directly and through its PBS wrappers; a second local user submits
the look-alikes with `runuser`. No VM boots: our jobs cannot start for an hour, or are held."""
from __future__ import annotations

import json
import os
import pwd
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from cluster.spec import load_spec
from cluster.store import Store
from submit import open_backend
from tests.submit_support import standin_spec
from tests.test_submit_slurm import TORQUE_BIN

OTHER_USER = "salvus-other"


@pytest.fixture(scope="module")
def other_user() -> str:
    """A second local account (kept: idempotent, and Slurm may still list its finished jobs)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to add a user and submit as it")
    try:
        pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER],
                       check=True, capture_output=True)
    return OTHER_USER


def site_spec(tmp_path: Path, backend: str, extra: str = "") -> Path:
    return standin_spec(tmp_path, f"backend: {backend}, require_image: false{extra}")


def submit_lookalikes(slurm_cluster, user: str, site: str) -> list[str]:
    """Two jobs as `user` that look like ours: the job name SITE.sage, our comment's form; one
    held, one that cannot start for an hour."""
    ids = []
    for when in ("--hold", "--begin=now+3600"):
        r = subprocess.run(["runuser", "-u", user, "--", "env", f"SLURM_CONF={slurm_cluster.conf}",
                            "sbatch", "--parsable", when, f"--job-name={site}.sage",
                            f"--comment=salvus::{secrets.token_hex(8)}:demo@1", "--chdir=/tmp",
                            "--output=/dev/null", "--wrap", "sleep 600"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        ids.append(r.stdout.strip().split(";")[0])
    return ids


def queue_states(slurm_cluster, ids: list[str]) -> dict[str, str]:
    out = slurm_cluster.run("squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i %T %r %u").stdout
    return {f[0]: " ".join(f[1:]) for f in (ln.split() for ln in out.splitlines())}


def cancelled_line_ids(stdout: str) -> list[str]:
    """The job ids of scale's `cancel N (ID:STATE, ...)`."""
    inside = stdout.split("cancel ", 1)[1].split("(", 1)[1].split(")", 1)[0]
    return [item.split(":")[0] for item in inside.split(", ")]


def test_slurm_counts_lists_and_cancels_only_our_jobs(tmp_path, slurm_cluster, other_user, cli):
    spec = site_spec(tmp_path, "slurm", ', extra_directives: ["--begin=now+3600"]')
    site = load_spec(spec).site
    theirs = submit_lookalikes(slurm_cluster, other_user, site)
    try:
        assert queue_states(slurm_cluster, theirs) == {
            theirs[0]: f"PENDING JobHeldUser {other_user}", theirs[1]: f"PENDING BeginTime {other_user}"}
        # Their two jobs do not count: sage=2 submits two of ours.
        r = cli("--spec", str(spec), "scale", "sage=2")
        assert r.returncode == 0 and "have 0 (queued 0, running 0, held 0" in r.stdout and "submit 2" in r.stdout, \
            r.stdout + r.stderr
        ours = [j.job_id for j in open_backend(load_spec(spec)).list("sage")]
        assert len(ours) == 2 and not set(ours) & set(theirs)
        assert {s.split()[-1] for s in queue_states(slurm_cluster, ours).values()} == {"root"}

        st = json.loads(cli("--spec", str(spec), "status", "--json").stdout)
        assert sorted(j["job_id"] for j in st["jobs"]) == sorted(ours)
        assert (st["roles"]["sage"]["queued"], st["roles"]["sage"]["held"]) == (2, 0)
        assert "nothing to do" in cli("--spec", str(spec), "scale", "sage=2").stdout

        # sage=1 cancels one of ours (their held one would go first were it counted).
        r = cli("--spec", str(spec), "scale", "sage=1")
        assert r.returncode == 0 and cancelled_line_ids(r.stdout)[0] in ours, r.stdout + r.stderr
        assert len(cancelled_line_ids(r.stdout)) == 1
        assert cli("--spec", str(spec), "stop", "sage").returncode == 0
        assert [s.split()[0] for s in queue_states(slurm_cluster, ours).values()] == ["CANCELLED"] * 2
        assert queue_states(slurm_cluster, theirs) == {
            theirs[0]: f"PENDING JobHeldUser {other_user}", theirs[1]: f"PENDING BeginTime {other_user}"}

        # Naming their account makes their jobs the site's: listed, but never submitted to as root.
        as_them = spec.read_text().replace("require_image: false", f"require_image: false, submit_user: {other_user}")
        spec.write_text(as_them)
        st = json.loads(cli("--spec", str(spec), "status", "--json").stdout)
        assert sorted(j["job_id"] for j in st["jobs"]) == sorted(theirs)
        r = cli("--spec", str(spec), "scale", "sage=3")
        assert r.returncode == 78 and r.stderr.count("\n") == 1, r.stderr
        assert (f"scheduler.submit_user is '{other_user}' but jobs submitted here run as 'root'"
                in r.stderr), r.stderr
    finally:
        slurm_cluster.run("scancel", *theirs)


def test_slurm_unknown_submit_user_is_one_line_not_an_empty_queue(tmp_path, slurm_cluster, cli):
    # squeue prints "Invalid user" and exits 0 with no jobs: read as none queued, scale would submit.
    spec = site_spec(tmp_path, "slurm", ", submit_user: nosuchuser9")
    r = cli("--spec", str(spec), "status")
    assert r.returncode == 78 and r.stderr.count("\n") == 1, r.stderr
    assert "scheduler.submit_user: Slurm knows no user 'nosuchuser9' (squeue: error: Invalid user: nosuchuser9)" \
        in r.stderr, r.stderr


def test_pbs_counts_lists_and_cancels_only_our_jobs(tmp_path, slurm_cluster, other_user, cli):
    # Slurm's qstat wrapper: `-u` switches `-f` to its one-line table, so the backend reads Job_Owner.
    spec = site_spec(tmp_path, "pbs", f', bin_dir: {TORQUE_BIN}, extra_directives: ["-h"]')
    theirs = submit_lookalikes(slurm_cluster, other_user, load_spec(spec).site)
    try:
        r = cli("--spec", str(spec), "scale", "sage=2")
        assert r.returncode == 0 and "submit 2" in r.stdout, r.stdout + r.stderr
        ours = [j.job_id for j in open_backend(load_spec(spec)).list("sage")]
        assert len(ours) == 2 and not set(ours) & set(theirs)
        st = json.loads(cli("--spec", str(spec), "status", "--json").stdout)
        # Slurm's qstat shows a held job as Q: held or queued, ours only.
        assert sorted(j["job_id"] for j in st["jobs"]) == sorted(ours)
        assert st["roles"]["sage"]["held"] + st["roles"]["sage"]["queued"] == 2, st["roles"]

        r = cli("--spec", str(spec), "scale", "sage=1")
        assert r.returncode == 0 and cancelled_line_ids(r.stdout)[0] in ours, r.stdout + r.stderr
        assert cli("--spec", str(spec), "stop", "sage").returncode == 0
        assert [s.split()[0] for s in queue_states(slurm_cluster, ours).values()] == ["CANCELLED"] * 2
        assert [s.split()[0] for s in queue_states(slurm_cluster, theirs).values()] == ["PENDING"] * 2
    finally:
        slurm_cluster.run("scancel", *theirs)


def test_local_executor_reads_only_the_records_its_user_owns(tmp_path, other_user):
    spec = load_spec(site_spec(tmp_path, "local"))
    backend = open_backend(spec)
    records = Store.of(spec).runtime.local_jobs_dir
    records.mkdir(parents=True)
    for job_id, owner in (("1-ours", None), ("2-theirs", other_user)):
        path = records / f"{job_id}.json"
        path.write_text(json.dumps({"job_id": job_id, "role": "sage", "service_id": f"sage-{job_id}",
                                    "submitted": time.time(), "pid": None}))
        if owner:
            os.chown(path, pwd.getpwnam(owner).pw_uid, -1)
    (records / "3-link.json").symlink_to(records / "1-ours.json")  # not a plain file: no record
    assert [(j.job_id, j.state) for j in backend.list()] == [("1-ours", "queued")]
    assert backend.recorded_ids() == {"1-ours"}
