"""Which jobs `scale` cancels first, and how it counts: the planning rules on their own."""
from __future__ import annotations

from submit.base import Job
from submit.scale import cancel_order, registered_ids
from cluster.registry import Service


def job(job_id: str, state: str, submitted: float, sid: str | None = None) -> Job:
    return Job(job_id, "sage", state, sid or f"sage-{job_id}", submitted, backend="slurm")


def test_cancel_order_held_and_queued_then_unregistered_then_registered_newest_first():
    jobs = [job("1", "running", 100), job("2", "running", 200), job("3", "running", 300),
            job("4", "queued", 50), job("5", "held", 400), job("6", "queued", 500)]
    registered = {"sage-1", "sage-3"}
    assert [j.job_id for j in cancel_order(jobs, registered)] == ["6", "5", "4", "2", "3", "1"]


def test_equal_submit_times_break_ties_by_the_later_job_id():
    jobs = [job("9", "running", 100), job("10", "running", 100), job("8", "running", 100)]
    assert [j.job_id for j in cancel_order(jobs, set())] == ["10", "9", "8"]


def test_registered_by_service_id_or_by_scheduler_and_job_id():
    jobs = [job("1", "running", 1), job("2", "running", 2, sid="custom"), job("3", "running", 3)]
    services = [Service("sage", "sage-1", "h", 1), Service("sage", "other", "h", 2, scheduler="slurm", job_id="2"),
                Service("sage", "x", "h", 3, scheduler="local", job_id="3")]
    assert registered_ids(jobs, services, "slurm") == {"sage-1", "custom"}
