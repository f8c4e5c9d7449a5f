"""The store: its layout version and migration, the job-status contract, and that the layout has one
owner (`cluster/store.py`)."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import jobstatus
from cluster.errors import DataError, SpecError
from cluster.files import lock_holder, locked, write_atomic
from cluster.jobstatus import JobStatus
from cluster.store import LAYOUT_VERSION, Store

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("cluster", "catalogue", "imagedist", "jobwrappers", "submit")


def test_new_store_is_stamped_with_the_current_layout(tmp_path):
    store = Store(tmp_path / "store").open()
    assert LAYOUT_VERSION == 2 and store.layout_version() == LAYOUT_VERSION
    assert store.layout_file == store.root / "layout.json"  # beside state/, which job users write
    assert json.loads(store.layout_file.read_text()) == {"layout": LAYOUT_VERSION}


def _layout_1_store(root: Path) -> Store:
    """A store as layout 1 left it: trust state inside state/, beside the runtime files."""
    state = root / "state"
    (state / "catalogue").mkdir(parents=True)
    pointer = {"version": 7, "sha256": "ab" * 32, "index": "index-7-ab.yaml", "sig": "index-7-ab.yaml.sig"}
    (state / "catalogue" / "accepted.json").write_text(json.dumps(pointer))
    (state / "catalogue" / "index-7-ab.yaml").write_text("the signed bytes\n")
    (state / "approvals.yaml").write_text("approved: [demo@1]\n")
    (state / "hash-cache.json").write_text("{}\n")
    (state / "jobs").mkdir()
    (state / "layout.json").write_text(json.dumps({"layout": 1}))
    return Store(root)


def test_layout_1_store_moves_its_trust_state_by_rename(tmp_path):
    store = _layout_1_store(tmp_path / "store")
    old = {name: (store.state / name) for name in ("catalogue/accepted.json", "catalogue/index-7-ab.yaml",
                                                     "approvals.yaml", "hash-cache.json")}
    before = {name: (p.read_bytes(), p.stat().st_ino) for name, p in old.items()}
    assert store.layout_version() == 1
    store.open()
    assert store.layout_version() == 2 and not (store.state / "layout.json").exists()
    trust = store.checked_trust()
    assert trust.dir == store.root / "trust" and store.runtime.dir == store.state
    moved = {"catalogue/accepted.json": trust.catalogue_dir / "accepted.json",
             "catalogue/index-7-ab.yaml": trust.catalogue_dir / "index-7-ab.yaml",
             "approvals.yaml": trust.approvals, "hash-cache.json": trust.hash_cache}
    # the same inodes with the same bytes: renamed, never copied, never reset (the rollback floor)
    assert {name: (p.read_bytes(), p.stat().st_ino) for name, p in moved.items()} == before
    assert not any(p.exists() for p in old.values()) and (store.state / "jobs").is_dir()
    assert store.open().layout_version() == 2  # opening again moves nothing


def test_unversioned_store_is_migrated_without_resetting_trust_state(tmp_path):
    store = _layout_1_store(tmp_path / "store")
    (store.state / "layout.json").unlink()
    assert store.layout_version() == 0
    store.open()
    assert store.layout_version() == LAYOUT_VERSION
    assert json.loads((store.trust.catalogue_dir / "accepted.json").read_text())["version"] == 7
    assert store.trust.approvals.read_text() == "approved: [demo@1]\n"


def test_migration_never_overwrites_trust_state_already_there(tmp_path):
    store = _layout_1_store(tmp_path / "store")
    store.trust.dir.mkdir(mode=0o755)
    store.trust.approvals.write_text("approved: [other@2]\n")
    store.open()
    assert store.trust.approvals.read_text() == "approved: [other@2]\n"
    assert (store.state / "approvals.yaml").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_migration_drops_a_hash_cache_another_user_wrote(tmp_path):
    store = _layout_1_store(tmp_path / "store")
    os.chown(store.state / "hash-cache.json", 65534, 65534)  # the job user's wrapper wrote it
    store.open()
    assert not store.trust.hash_cache.exists() and not (store.state / "hash-cache.json").exists()
    assert (store.trust.catalogue_dir / "accepted.json").exists()


def test_trust_dir_writable_by_others_or_owned_by_another_user_is_refused(tmp_path):
    store = Store(tmp_path / "store").open()
    trust = store.checked_trust(create=True)
    assert stat.S_IMODE(trust.dir.stat().st_mode) == 0o755
    for path in (trust.dir, trust.catalogue_dir, store.root):
        os.chmod(path, 0o775)
        with pytest.raises(DataError, match=r"writable by group or others \(mode 0775\)") as e:
            store.checked_trust()
        assert str(path) in str(e.value) and "\n" not in str(e.value)
        os.chmod(path, 0o755)
    os.chmod(store.root, 0o1777)  # sticky: others cannot rename trust/ away
    store.checked_trust()
    os.chmod(store.root, 0o755)
    if os.geteuid() == 0:
        os.chown(trust.dir, 65534, 65534)
        with pytest.raises(DataError, match="owned by uid 65534, not by the store's owner"):
            store.checked_trust()


def test_write_atomic_does_not_write_through_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    target = tmp_path / "state" / "desired.json"
    target.parent.mkdir()
    # layout 1's temp name was predictable: .NAME.tmpPID
    os.symlink(victim, target.with_name(f".{target.name}.tmp{os.getpid()}"))
    os.symlink(victim, target)
    write_atomic(target, b"{}\n", mode=0o640)
    assert victim.read_bytes() == b"precious\n"
    assert not target.is_symlink() and target.read_bytes() == b"{}\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_lock_through_a_symlink_is_refused_and_truncates_nothing(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    lock = tmp_path / "state" / "imgdist.lock"
    lock.parent.mkdir()
    os.symlink(victim, lock)
    with pytest.raises(DataError, match="imgdist.lock: is a symlink; refused as a lock file") as e:
        with locked(lock, record_pid=True):
            pass
    assert "\n" not in str(e.value) and victim.read_bytes() == b"precious\n"
    lock.unlink()
    os.link(victim, lock)  # a hard link to a file elsewhere
    with pytest.raises(DataError, match="not a plain file with one link"):
        with locked(lock, record_pid=True):
            pass
    assert victim.read_bytes() == b"precious\n"
    assert lock_holder(lock) is None


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
STORE_JOIN = re.compile(r"""store_path\s*/|store\.root\s*/|/\s*["'](state|trust|persistent)["']""")


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
