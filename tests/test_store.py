"""The store: its layout version and migration, the job-status contract, and that the layout has one
owner (`cluster/store.py`)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import jobstatus
from cluster.errors import SpecError
from cluster.jobstatus import JobStatus
from cluster.store import LAYOUT_VERSION, Store

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("cluster", "catalogue", "imagedist", "jobwrappers", "submit")


def test_new_store_is_stamped_with_the_current_layout(tmp_path):
    store = Store(tmp_path / "store").open()
    assert store.layout_version() == LAYOUT_VERSION
    assert json.loads(store.layout_file.read_text()) == {"layout": LAYOUT_VERSION}


def test_unversioned_store_is_migrated_without_touching_trust_state(tmp_path):
    store = Store(tmp_path / "store")
    trust = store.trust
    trust.catalogue_dir.mkdir(parents=True)
    pointer = {"version": 7, "sha256": "ab" * 32, "index": "index-7-ab.yaml", "sig": "index-7-ab.yaml.sig"}
    (trust.catalogue_dir / "accepted.json").write_text(json.dumps(pointer))
    trust.approvals.write_text("approved: [demo@1]\n")
    before = {p: p.read_bytes() for p in store.state.rglob("*") if p.is_file()}
    assert store.layout_version() == 0
    store.open()
    assert store.layout_version() == LAYOUT_VERSION
    assert {p: p.read_bytes() for p in before} == before  # the rollback floor is where it was


def test_store_from_a_newer_version_is_refused_in_one_line(tmp_path):
    store = Store(tmp_path / "store")
    store.state.mkdir(parents=True)
    store.layout_file.write_text(json.dumps({"layout": LAYOUT_VERSION + 1}))
    with pytest.raises(SpecError, match=f"store layout {LAYOUT_VERSION + 1} is newer") as e:
        store.open()
    assert "\n" not in str(e.value)
    store.layout_file.write_text("{not json")
    with pytest.raises(SpecError, match="layout.json: damaged"):
        store.open()


def test_a_command_on_a_newer_store_exits_78(tmp_path):
    store = Store(tmp_path / "store")
    store.state.mkdir(parents=True)
    store.layout_file.write_text(json.dumps({"layout": LAYOUT_VERSION + 1}))
    spec = tmp_path / "cluster.yaml"
    spec.write_text(f"store: {store.root}\nroles: {{sage: {{image: demo@1, port: 6000}}}}\n"
                    "catalogue: {insecure_allow_unsigned: true}\n")
    proc = subprocess.run([sys.executable, "-c", "import salvus_jobs, sys; sys.exit(salvus_jobs.main())",
                           "--spec", str(spec), "scale", "sage=0", "--dry-run"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 78, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "newer than this salvus-jobs" in proc.stderr


def _status(sid: str, pid: int) -> JobStatus:
    return JobStatus(sid, "sage", "42", pid, "running", "127.0.0.1:6000", "/x.log", started=1.5e9, image="demo@1",
                     workdir="/w")


def test_job_status_round_trip_and_stale_files(tmp_path):
    store = Store(tmp_path)
    path = jobstatus.write(store, _status("sage-1", os.getpid()))
    assert path == store.runtime.job_status("sage-1")
    assert jobstatus.read(store, "sage-1") == _status("sage-1", os.getpid())
    dead = subprocess.Popen(["true"])
    dead.wait()
    jobstatus.write(store, _status("sage-2", dead.pid))
    store.runtime.job_status("sage-3").write_text("{half")
    live = jobstatus.read_all(store)
    assert [(p.name, s and s.service_id) for p, s in live] == [("sage-1.json", "sage-1"), ("sage-3.json", None)]
    jobstatus.remove(store, "sage-1", pid=os.getpid() + 1)  # not ours: kept
    assert store.runtime.job_status("sage-1").exists()
    jobstatus.remove(store, "sage-1", pid=os.getpid())
    assert not store.runtime.job_status("sage-1").exists()


def test_job_status_with_wrong_types_is_unreadable(tmp_path):
    store = Store(tmp_path)
    raw = json.loads(json.dumps(_status("sage-1", os.getpid()).__dict__))
    raw["pid"] = "1234"
    store.runtime.job_status("sage-1").parent.mkdir(parents=True)
    store.runtime.job_status("sage-1").write_text(json.dumps(raw))
    assert jobstatus.read(store, "sage-1") is None


# Joining a name onto the store's root (or its state directory) anywhere but the store's own module.
# (A catalogue directory has an `images/` of its own: that layout is the endorser's, not the store's.)
STORE_JOIN = re.compile(r"""store_path\s*/|store\.root\s*/|/\s*["'](state|persistent)["']""")


def test_only_cluster_store_joins_store_paths():
    offenders = []
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            if f == REPO / "cluster" / "store.py":
                continue
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if STORE_JOIN.search(line):
                    offenders.append(f"{f.relative_to(REPO)}:{n}: {line.strip()}")
    assert offenders == []
