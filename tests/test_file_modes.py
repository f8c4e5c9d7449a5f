"""What the store's files are created with, whatever the umask: state and logs 0640 (an operator
group may read), the SQLite registry with its -wal/-shm and persistent disks 0600, a VM's console
log 0640; the layout and trust state, which every job user's wrapper reads, 0644. Run under umask 0,
so only the code's own modes count."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cluster import jobstatus
from cluster.files import write_atomic
from cluster.registry import Service
from cluster.registry.sqlite import SqliteRegistry
from cluster.spec import DiskSpec, parse_spec
from cluster.store import Store
from jobwrappers.disks import ensure_persistent_disk
from submit.base import Job, Ledger
from tests.fixtures.demo_image import demo_spec_text
from tests.test_job_environment import env_dump_spec, job_environ


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def no_umask():
    old = os.umask(0)
    yield
    os.umask(old)


def test_state_files_and_job_logs_of_a_submission_are_closed_to_others(tmp_path, no_umask, cli):
    spec, out = env_dump_spec(tmp_path, "local")
    assert cli("--spec", str(spec), "scale", "sage=1").returncode == 0
    job_environ(out)  # the job ran: its supervisor wrote its state too
    store = tmp_path / "store"
    files = {p.relative_to(store): mode(p) for p in store.rglob("*") if p.is_file()}
    assert {"state", "logs"} <= {p.parts[0] for p in files}
    assert any(p.suffix == ".state" for p in files) and any(p.suffix == ".err" for p in files)
    assert files.pop(Path("state/registry.sqlite")) == 0o600
    layout = next(p for p in files if p.name == "layout.json")  # state/ here, the root after trust's move
    assert files.pop(layout) == 0o644
    # Lock files hold nothing but a pid (cluster.files.locked).
    assert {p: oct(m) for p, m in files.items() if m != 0o640 and p.suffix != ".lock"} == {}


def test_job_status_and_the_ledger_are_closed_to_others_and_trust_state_stays_readable(tmp_path, no_umask):
    store = Store(tmp_path / "store")
    status = jobstatus.write(store, jobstatus.JobStatus("sage-1", "sage", "7", os.getpid(), "booting", "", ""))
    spec = parse_spec(f"store: {store.root}\nroles: {{sage: {{image: demo@1, port: 6000}}}}\n", tmp_path / "c.yaml")
    ledger = Ledger(spec, "slurm")
    ledger.add(Job("7", "sage", "queued", "sage-7", 0.0))  # a registry row: the registry is 0600
    ledger.close()
    assert (mode(status), mode(spec.sqlite_path)) == (0o640, 0o600)
    # Every job user's wrapper reads the layout and trust state: public, as before.
    write_atomic(store.trust.approvals, b"{}\n")
    assert mode(store.trust.approvals) == 0o644


def test_sqlite_registry_and_its_wal_and_shm_are_owner_only(tmp_path, no_umask):
    path = tmp_path / "state" / "registry.sqlite"
    with SqliteRegistry(path) as reg:
        reg.register(Service(role="sage", service_id="sage-1", host="h", port=1, hypervisor="hv",
                             scheduler="local", job_id="1", image="demo@1"))
        files = {p.name: mode(p) for p in path.parent.iterdir()}
    assert files == {"registry.sqlite": 0o600, "registry.sqlite-wal": 0o600, "registry.sqlite-shm": 0o600}


def test_persistent_disk_and_its_directory_are_owner_only(tmp_path, no_umask):
    path = ensure_persistent_disk(Store(tmp_path), "cassandra-0", DiskSpec(name="data", size_mb=16))
    assert (mode(path), mode(path.parent)) == (0o600, 0o700)


@pytest.mark.vm
def test_console_log_and_persistent_disk_of_a_wrapper_run(tmp_path, demo_image, run_wrapper, no_umask):
    spec = tmp_path / "cluster.yaml"
    spec.write_text(demo_spec_text(demo_image, tmp_path / "store", boot_timeout=2))
    run = run_wrapper(spec, "cassandra", "cassandra-0")
    assert run.proc.wait(60) == 75  # not ready in 2 s: the files are made by then
    store = Store(tmp_path / "store")
    assert mode(store.console_log("cassandra-0")) == 0o640
    disks = list((tmp_path / "store" / "persistent" / "cassandra-0").iterdir())
    assert disks and all(mode(d) == 0o600 for d in disks)
    assert mode(run.spec.sqlite_path) == 0o600
