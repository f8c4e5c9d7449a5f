"""What a scheduler's listing says about a job's walltime clock, its image and how it ended. Slurm:
squeue's start time (%S) and time limit (%l), the job comment (`salvus:SID:TOKEN[:IMAGE]`, anyone's
writing) and the final state, parsed and validated; PBS/Torque: a successor held for its
dependency is queued, not held."""
from __future__ import annotations

import time

import pytest

from cluster.spec import load_spec
from submit.pbs import PbsBackend, parse_qstat_full
from submit.slurm import SlurmBackend, parse_comment, parse_squeue, parse_time_limit


@pytest.fixture
def backend(tmp_path):
    spec = tmp_path / "cluster.yaml"
    spec.write_text("site: s\nscheduler: {backend: slurm, walltime: '2:00:00'}\n"
                    "roles: {sage: {image: demo@1, port: 8080}}\n")
    return SlurmBackend(load_spec(spec))


def line(state: str = "RUNNING", start: str = "2026-01-01T00:00:10", limit: str = "1:00:00",
         comment: str = "salvus:sage-0:abc123:demo@2", job_id: str = "12") -> str:
    return f"{job_id}|s.sage|{state}|None|2026-01-01T00:00:00|{start}|{limit}|{comment}\n"


@pytest.mark.parametrize("text, seconds", [
    ("UNLIMITED", None), ("N/A", None), ("INVALID", None), ("NOT_SET", None), ("", None),
    ("0:30", 30), ("15:00", 900), ("1:00:00", 3600), ("12:34:56", 45296), ("1-00:00:00", 86400),
    ("2-03:04:05", 183845), ("1:75", None), ("$(reboot)", None), ("-1", None),
])
def test_time_limit_forms(text, seconds):
    assert parse_time_limit(text) == seconds


def test_running_job_carries_start_limit_and_image(backend):
    (job,) = parse_squeue(line(), backend)
    assert job.started == time.mktime(time.strptime("2026-01-01T00:00:10", "%Y-%m-%dT%H:%M:%S"))
    assert (job.walltime_s, job.image, job.service_id, job.token, job.ended_by) == (3600, "demo@2", "sage-0", "abc123", "")
    # The --signal lead is the grace (stop_timeout 20 + 15) + 60; Slurm may signal 60 s earlier still.
    assert backend.earliest_signal(job) == job.started + 3600 - 95 - 60


def test_pending_job_has_no_start_even_when_slurm_guesses_one(backend):
    (job,) = parse_squeue(line("PENDING", start="2026-01-01T01:00:00"), backend)
    assert (job.state, job.started, job.walltime_s) == ("queued", None, 3600)
    assert backend.earliest_signal(job) is None


def test_unlimited_job_falls_back_to_the_spec_walltime_for_its_earliest_signal(backend):
    (job,) = parse_squeue(line(limit="UNLIMITED"), backend)
    assert job.walltime_s is None
    assert backend.earliest_signal(job) == job.started + 7200 - 95 - 60


@pytest.mark.parametrize("state, ours, ended_by", [
    ("TIMEOUT", "failed", "walltime"), ("CANCELLED", "done", "cancel"), ("CANCELLED by 1000", "done", "cancel"),
    ("COMPLETED", "done", "exit"), ("FAILED", "failed", "exit"), ("NODE_FAIL", "failed", ""),
    ("RUNNING", "running", ""), ("COMPLETING", "stopping", ""),
])
def test_ended_by_follows_the_final_state(backend, state, ours, ended_by):
    (job,) = parse_squeue(line(state), backend)
    assert (job.state, job.ended_by) == (ours, ended_by)


def test_three_field_comment_of_a_job_queued_before_the_image_was_added(backend):
    (job,) = parse_squeue(line(comment="salvus:sage-0:abc123"), backend)
    assert (job.service_id, job.token, job.image) == ("sage-0", "abc123", "")


@pytest.mark.parametrize("comment, parsed", [
    ("salvus:sage-0:abc123:demo@2", ("sage-0", "abc123", "demo@2")),
    ("salvus::abc123:demo@2", ("", "abc123", "demo@2")),
    ("salvus:sage-0:abc123:../../etc@1", ("sage-0", "abc123", "")),
    ("salvus:sage-0:abc123:demo@2:extra", ("sage-0", "abc123", "")),
    ("salvus:sage-0:abc123:demo", ("sage-0", "abc123", "")),
    ("salvus:../x:ab c:demo@1", ("", "", "demo@1")),
    ("someone else's comment", ("", "", "")),
])
def test_comment_fields_are_validated(comment, parsed):
    assert parse_comment(comment) == parsed


def test_a_pipe_in_a_comment_does_not_shift_the_fields(backend):
    (job,) = parse_squeue(line(comment="salvus:sage-0:abc123:demo@1|1:00|x"), backend)
    assert (job.walltime_s, job.image, job.service_id) == (3600, "", "sage-0")


def test_successor_is_refused_for_a_job_id_that_is_not_slurms(backend):
    from cluster.errors import SchedulerError

    with pytest.raises(SchedulerError, match="a successor waits for a Slurm job id, got '12; rm'"):
        backend.submit_one("sage", "sage-0", "tok", after="12; rm")
    assert backend.dependencies


QSTAT_HELD = """Job Id: 41.pbs0
    Job_Name = s.sage
    Job_Owner = alice@login0
    job_state = H
    Hold_Types = {holds}
    qtime = Thu Jan  1 00:00:00 2026
    depend = afterany:40.pbs0@pbs0
"""


@pytest.mark.parametrize("holds, state, reason", [
    ("s", "queued", "waiting for afterany:40.pbs0@pbs0"),  # held by Torque for its dependency
    ("u", "held", "job_state H"),  # an operator's hold on a successor is still a hold
])
def test_torque_successor_held_for_its_dependency_is_queued(tmp_path, holds, state, reason):
    spec = tmp_path / "cluster.yaml"
    spec.write_text("site: s\nscheduler: {backend: pbs, submit_user: alice}\nroles: {sage: {image: demo@1, port: 8080}}\n")
    (job,) = parse_qstat_full(QSTAT_HELD.format(holds=holds), PbsBackend(load_spec(spec)), {})
    assert (job.state, job.hold_reason) == (state, reason)


def test_htcondor_successor_waits_only_for_a_job_id(tmp_path):
    # HTCondor queues successors (held, released by the controller: tests/test_condor_live.py); the
    # job it waits for goes into a ClassAd string and a constraint, so it must be a ClusterId.ProcId.
    from cluster.errors import SchedulerError
    from submit import open_backend

    spec = tmp_path / "cluster.yaml"
    spec.write_text("site: s\nscheduler: {backend: condor}\nroles: {sage: {image: demo@1, port: 8080}}\n")
    backend = open_backend(load_spec(spec))
    assert backend.dependencies
    with pytest.raises(SchedulerError, match=r"^condor: a successor waits for a ClusterId.ProcId, got '1.0 \|\| true'$"):
        backend.submit_one("sage", "sage-0", "tok", after="1.0 || true")
