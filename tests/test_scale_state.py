"""Desired counts, the ledger and the reconcile lease held in the registry (schema 4): an older
version's files are moved in once, rows anyone could write are checked, and `scale` waits for
another `scale`'s lease but defers to a controller's."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cluster.errors import TempFailure
from cluster.registry import open_registry
from cluster.registry.lease import CONTROLLER_LEASE
from cluster.spec import load_spec
from submit import open_backend
from submit.base import Job
from submit.scale import DESIRED, read_desired, reconciler_lease, scale


@pytest.fixture
def spec_path(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(f"site: st\nstore: {tmp_path}/store\nscheduler: {{backend: slurm}}\n"
                    "roles: {sage: {image: demo@1, port: 6000, count: 1}, hub: {image: demo@1, port: 8080}}\n")
    return path


def test_an_older_versions_desired_counts_and_ledger_files_move_into_the_registry(spec_path, tmp_path):
    state = tmp_path / "store" / "state"
    (state / "submitted" / "slurm" / "pending").mkdir(parents=True)
    (state / "desired.json").write_text(json.dumps({"sage": 3, "hub": 2, "gone-role": 9}))
    job = Job("77", "sage", "queued", "sage-77", 1000.0, backend="slurm")
    (state / "submitted" / "slurm" / "77.json").write_text(json.dumps(job.to_dict()))
    (state / "submitted" / "slurm" / "pending" / "t1.json").write_text(
        json.dumps({"token": "t1", "role": "hub", "service_id": None, "submitted": 1.0}))
    spec = load_spec(spec_path)
    with open_registry(spec) as reg:
        assert read_desired(spec, reg) == {"sage": 3, "hub": 2}
        backend = open_backend(spec)
        backend.ledger.use(reg)
        assert [j.job_id for j in backend.ledger.jobs()] == ["77"]
        assert [i["token"] for i in backend.ledger.intents()] == ["t1"]
    assert not (state / "desired.json").exists()
    assert list((state / "submitted" / "slurm").rglob("*.json")) == []
    with open_registry(spec) as reg:  # moved for good: read from the registry from now on
        assert read_desired(spec, reg) == {"sage": 3, "hub": 2}


def test_registry_rows_that_are_no_counts_or_no_jobs_are_ignored(spec_path):
    spec = load_spec(spec_path)
    with open_registry(spec) as reg:
        for role, value in (("sage", "-1"), ("hub", "²"), ("other", "4")):
            reg.write_state(DESIRED, role, value)
        assert read_desired(spec, reg) == {"sage": 1, "hub": 0}  # the spec's counts
        reg.write_state("ledger:slurm", "x", "{not json")
        reg.write_state("ledger:slurm", "y", json.dumps({"job_id": 5, "role": "sage", "state": "queued",
                                                         "service_id": None, "submitted": 0}))
        backend = open_backend(spec)
        backend.ledger.use(reg)
        assert backend.ledger.jobs() == []


def test_scale_defers_to_a_controller_and_waits_for_another_scale(spec_path, monkeypatch):
    spec = load_spec(spec_path)
    with open_registry(spec) as reg:
        assert reg.acquire_lease(CONTROLLER_LEASE, "controller elsewhere:1:abc", 30) is not None
        plan, submitted = scale(spec, {"sage": 4})  # recorded, nothing submitted: the controller acts
        assert plan.controller == "controller elsewhere:1:abc" and submitted == []
        assert read_desired(spec, reg)["sage"] == 4
        reg.release_lease(CONTROLLER_LEASE, "controller elsewhere:1:abc", reg.lease(CONTROLLER_LEASE).token)
        assert reg.acquire_lease(CONTROLLER_LEASE, f"scale other:{os.getpid()}:x", 30) is not None
        with pytest.raises(TempFailure, match="scale other.* has held the lease"):
            with reconciler_lease(reg, wait=1.0):
                pass
