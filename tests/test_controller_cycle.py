"""The controller's cycle in-process, on the real local executor and SQLite registry, with a wrapper
that only sleeps (these tests are about decisions, not VMs): bounded submissions, hysteresis, and
a stale token refusing every action."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from cluster.registry.lease import CONTROLLER_LEASE, StaleLease
from cluster.spec import load_spec
from submit.controller import Controller
from submit.scale import DESIRED, stop_roles
from submit.base import ACTIVE_STATES


@pytest.fixture
def spec(tmp_path: Path):
    wrapper = tmp_path / "sleepy-vmjob"
    wrapper.write_text("#!/bin/sh\nexec sleep 300\n")
    wrapper.chmod(0o755)
    path = tmp_path / "cluster.yaml"
    path.write_text(f"site: cyc\nstore: {tmp_path}/store\nscheduler: {{backend: local, wrapper: {wrapper}}}\n"
                    "controller: {interval: 1, lease: 30, listen: '127.0.0.1:0', max_submit: 2, cancel_after: 3}\n"
                    "roles: {sage: {image: demo@1, port: 6000}}\n")
    spec = load_spec(path)
    yield spec
    stop_roles(spec, ["sage"], wait=True, timeout=10)


def active(c: Controller) -> list:
    return [j for j in c.backend.list("sage") if j.state in ACTIVE_STATES]


def test_submissions_are_bounded_per_cycle_and_a_surplus_waits_cancel_after_cycles(spec):
    c = Controller(spec)
    c.registry.write_state(DESIRED, "sage", "3")
    c.cycle()
    assert len(active(c)) == 2  # max_submit
    c.cycle()
    assert len(active(c)) == 3
    c.cycle()
    assert len(active(c)) == 3  # steady: nothing more
    c.registry.write_state(DESIRED, "sage", "1")
    c.cycle()
    c.cycle()
    assert len(active(c)) == 3  # a surplus seen twice is not acted on yet
    c.cycle()
    assert len(active(c)) == 1
    kinds = [e["kind"] for e in c.events]
    assert kinds.count("cancel") == 2 and kinds.count("submitted") == 3
    assert c.status["roles"]["sage"]["desired"] == 1


def test_a_controller_whose_lease_passed_on_does_nothing(spec):
    c = Controller(spec)
    c.cycle()
    assert c.lease is not None
    # Another holder took the lease (ours ran out while we were paused, say).
    c.registry.release_lease(CONTROLLER_LEASE, c.holder, c.lease.token)
    assert c.registry.acquire_lease(CONTROLLER_LEASE, "controller other:1:x", 30) is not None
    c.registry.write_state(DESIRED, "sage", "2")
    c.lease.renewed = time.monotonic()  # by its own clock it still has time: only the token is stale
    with pytest.raises(StaleLease, match="is stale"):
        c._reconcile()  # refused before its first action
    assert active(c) == []
    c.cycle()  # the next cycle finds the lease lost and stands by
    assert c.status["role"] == "standby" and active(c) == []
    assert any(e["kind"] == "lease" and "lost" in e["text"] for e in c.events)


def test_a_new_leader_finishes_the_drains_it_finds_and_drops_stale_rows(spec):
    from cluster.registry.base import DRAINING

    spec.roles["sage"].drain_seconds = 0
    c = Controller(spec)
    c.registry.write_state(DESIRED, "sage", "1")
    c.cycle()
    (job,) = active(c)
    # A controller that died mid-drain left its row; another row names a job long gone.
    c.registry.write_state(DRAINING, job.service_id, job.job_id)
    c.registry.write_state(DRAINING, "sage-gone", "12345-abcdef")
    c.lease.release()
    c2 = Controller(spec)
    c2.cycle()
    assert any(e["kind"] == "drain" and job.job_id in e["text"] for e in c2.events)
    assert c2.registry.read_state(DRAINING) == {job.service_id: job.job_id}
    c2.cycle()  # drain_seconds 0: stopped now; its replacement is the plan's shortfall
    states = {j.job_id: j.state for j in c2.backend.list("sage")}
    assert states.get(job.job_id, "gone") in ("stopping", "done", "gone")
    assert any(j != job.job_id and s in ACTIVE_STATES for j, s in states.items())
    wait_until_gone = time.monotonic() + 10
    while c2.registry.read_state(DRAINING) and time.monotonic() < wait_until_gone:
        c2.cycle()
        time.sleep(0.2)
    assert c2.registry.read_state(DRAINING) == {}  # removed once the job ended


def test_a_running_job_whose_vm_never_registers_is_replaced(spec):
    """A wrapper stuck before it registers (here: one that only sleeps) is running for the
    scheduler but serves nothing: after its boot_timeout and the clean-up grace it is replaced."""
    spec.hypervisor.boot_timeout = 1
    c = Controller(spec)
    c.registry.write_state(DESIRED, "sage", "1")
    c.cycle()
    (job,) = active(c)
    deadline = time.monotonic() + 40
    while not any(e["kind"] == "unregistered" for e in c.events) and time.monotonic() < deadline:
        time.sleep(1)
        c.cycle()
    assert any(e["kind"] == "unregistered" and job.job_id in e["text"] for e in c.events), list(c.events)
    c.cycle()
    now = [j for j in active(c)]
    assert len(now) == 1 and now[0].job_id != job.job_id


def test_an_edit_of_a_roles_image_in_the_spec_file_starts_a_rollout(spec):
    from submit.rollout import ROLLOUT, read_rollouts

    c = Controller(spec)
    c.registry.write_state(DESIRED, "sage", "1")
    c.cycle()
    (old,) = active(c)
    assert old.image == "demo@1"
    path = Path(spec.source)
    time.sleep(0.01)
    path.write_text(path.read_text().replace("image: demo@1", "image: demo@2"))
    c.cycle()
    assert any(e["kind"] == "spec" and "new image for sage" in e["text"] for e in c.events)
    assert any(e["kind"] == "rollout" and "demo@1 -> demo@2" in e["text"] for e in c.events)
    r = read_rollouts(spec, c.registry)["sage"]
    assert (r.previous, r.target) == ("demo@1", "demo@2") and c.registry.read_state(ROLLOUT)
    assert c.backend.job_image("sage") == "demo@2"
    # A spec that no longer loads is not followed; the running one stays.
    path.write_text(path.read_text() + "roles: {}\n")
    c.cycle()
    assert any(e["kind"] == "spec" and "does not load" in e["text"] for e in c.events)
    assert c.backend.job_image("sage") == "demo@2"
