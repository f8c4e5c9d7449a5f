"""The succession rules (submit/succession.py), the rollout rows (submit/rollout.py) and a drained
service's heartbeat, without VMs: a real SQLite registry where one is needed."""
from __future__ import annotations

from pathlib import Path

import pytest

from cluster.errors import SpecError
from cluster.registry import Service, open_registry
from cluster.registry.base import DRAINING
from cluster.spec import load_spec
from jobwrappers.heartbeat import Heartbeater
from submit.rollout import ROLLOUT, Rollout, current, read_rollouts, rollback, start_upgrade
from submit.succession import drainable, due, last_safe_stop, lead_time, p95


def test_lead_time_is_the_measured_p95_at_least_the_floor_plus_the_drain_and_two_cycles():
    assert lead_time([], floor=60, drain_seconds=10, interval=5) == 80
    samples = [10.0] * 19 + [200.0]  # one slow start in twenty is the 95th percentile's business
    assert p95(samples) == 10.0
    assert lead_time(samples + [150.0], floor=5, drain_seconds=0, interval=1) == 152.0
    assert lead_time([30.0, 40.0], floor=5, drain_seconds=2, interval=1) == 44.0


def test_a_job_is_due_when_its_earliest_signal_is_nearer_than_the_lead():
    assert due(now=100, earliest_signal=130, lead=31)
    assert not due(now=100, earliest_signal=131, lead=31)
    assert not due(now=100, earliest_signal=None, lead=10 ** 6)  # no walltime: never
    assert last_safe_stop(1000, drain_seconds=5, stop_s=20, interval=2) == 973


@pytest.mark.parametrize("fresh, retiring, desired, expected", [
    (0, 2, 2, 0),  # the successors are not healthy yet: nobody goes
    (1, 2, 2, 1),  # one successor healthy: one predecessor may go
    (2, 2, 2, 2),
    (5, 1, 2, 1),  # never more than are retiring
    (0, 1, 0, 1),  # desired 0: going is fine
])
def test_drainable_never_leaves_fewer_serving_than_desired(fresh, retiring, desired, expected):
    n = drainable(fresh, retiring, desired)
    assert n == expected
    assert fresh + retiring - n >= min(desired, fresh + retiring)


@pytest.fixture
def spec(tmp_path: Path):
    path = tmp_path / "cluster.yaml"
    path.write_text(f"store: {tmp_path}/store\nroles: {{sage: {{image: demo@1, port: 6000}}, "
                    "hub: {image: demo@1, port: 8080, image_path: /nonexistent/hub.qcow2}}\n")
    return load_spec(path)


def test_an_upgrade_row_says_what_new_jobs_boot_and_a_rollback_returns(spec):
    with open_registry(spec) as reg:
        assert current(spec, "sage", read_rollouts(spec, reg)).image == "demo@1"
        r = start_upgrade(spec, reg, "sage", "demo@2")
        assert (r.previous, r.target, r.image) == ("demo@1", "demo@2", "demo@2")
        got = current(spec, "sage", read_rollouts(spec, reg))
        assert got == r
        got.halted = True
        reg.write_state(ROLLOUT, "sage", got.to_json())
        assert current(spec, "sage", read_rollouts(spec, reg)).image == "demo@1"  # halted: the old one
        back = rollback(spec, reg, "sage")
        assert (back.target, back.previous, back.halted, back.failures) == ("demo@1", "demo@2", False, 0)
        with pytest.raises(SpecError, match="upgrade --image: expected NAME@VERSION"):
            start_upgrade(spec, reg, "sage", "demo@2;rm -rf /")
        with pytest.raises(SpecError, match="roles.hub: boots its own image_path"):
            start_upgrade(spec, reg, "hub", "demo@2")


def test_an_edit_of_the_specs_image_starts_a_rollout_from_what_the_role_boots(spec):
    rows = {"sage": Rollout(target="demo@2", previous="demo@1", spec_image="demo@1")}
    spec.roles["sage"].image = "demo@3"
    r = current(spec, "sage", rows)
    assert (r.previous, r.target, r.spec_image) == ("demo@2", "demo@3", "demo@3")


@pytest.mark.parametrize("row", ['{"target": "x@1"}', "not json", '["a"]',
                                 '{"target": "demo@2", "previous": "../../x@1", "spec_image": "demo@1"}',
                                 '{"target": "demo@2", "previous": "demo@1", "spec_image": "demo@1", "failures": "3"}'])
def test_unreadable_rollout_rows_are_ignored(spec, row, caplog):
    with open_registry(spec) as reg:
        reg.write_state(ROLLOUT, "sage", row)
        reg.write_state(ROLLOUT, "nosuchrole", '{"target": "demo@2", "previous": "demo@1", "spec_image": "demo@1"}')
        assert read_rollouts(spec, reg) == {}
    assert "ignoring unreadable rollout row for sage" in caplog.text


def test_a_drained_service_stays_deregistered_and_any_other_registers_again(spec):
    with open_registry(spec) as reg:
        mine = Service(role="sage", service_id="sage-7", host="127.0.0.1", port=6000, scheduler="local",
                       job_id="7")
        beat = Heartbeater(reg, mine, interval=0, ttl=30)
        beat.start()
        reg.deregister("sage-7")  # expired, say: registered again at the next beat
        beat.beat_if_due()
        assert reg.get("sage-7") is not None and not beat.draining
        reg.write_state(DRAINING, "sage-7", "6")  # another job of that id (a predecessor) is drained
        reg.deregister("sage-7")
        beat.beat_if_due()
        assert reg.get("sage-7") is not None and not beat.draining
        reg.write_state(DRAINING, "sage-7", "7")  # this job: the controller drains it
        reg.deregister("sage-7")
        beat.beat_if_due()
        beat.beat_if_due()
        assert reg.get("sage-7") is None and beat.draining
