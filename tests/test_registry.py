"""The backend-independent registry suite: the same tests for every backend in REGISTRY_BACKENDS."""
from __future__ import annotations

import multiprocessing
import os
import signal
import time


import pytest

from cluster.registry import Service, open_registry
from tests import registry_workers


def svc(sid: str, role: str = "sage", port: int = 6000, **kw) -> Service:
    return Service(role=role, service_id=sid, host="127.0.0.1", port=port, hypervisor="hv1",
                   scheduler="local", job_id="42", image="demo@1", **kw)


def test_register_lookup_heartbeat_deregister(registry_spec_factory):
    with open_registry(registry_spec_factory()) as reg:
        reg.register(svc("sage-a"))
        reg.register(svc("sage-b", port=6001))
        reg.register(svc("hub-a", role="hub", port=8080))
        assert sorted(s.service_id for s in reg.lookup("sage")) == ["sage-a", "sage-b"]
        assert [s.service_id for s in reg.lookup("hub")] == ["hub-a"]
        assert reg.lookup("cassandra") == []
        got = reg.get("sage-b")
        assert (got.host, got.port, got.hypervisor, got.job_id, got.image) == ("127.0.0.1", 6001, "hv1", "42", "demo@1")
        before = got.last_heartbeat
        time.sleep(0.05)
        assert reg.heartbeat("sage-b") is True
        assert reg.get("sage-b").last_heartbeat > before
        reg.deregister("sage-a")
        assert [s.service_id for s in reg.lookup("sage")] == ["sage-b"]
        assert reg.heartbeat("sage-a") is False  # gone: the wrapper must re-register
        assert {s.service_id for s in reg.all()} == {"sage-b", "hub-a"}


def test_service_without_heartbeats_expires_after_ttl(registry_spec_factory):
    with open_registry(registry_spec_factory(ttl=2)) as reg:
        reg.register(svc("short-lived"))
        reg.register(svc("kept-alive", port=6001))
        assert len(reg.lookup("sage")) == 2
        deadline = time.time() + 3.5
        while time.time() < deadline:
            assert reg.heartbeat("kept-alive")
            time.sleep(0.5)
        assert [s.service_id for s in reg.lookup("sage")] == ["kept-alive"]
        assert reg.heartbeat("short-lived") is False
        assert reg.get("short-lived") is None


def test_reregistering_replaces_never_duplicates(registry_spec_factory):
    with open_registry(registry_spec_factory()) as reg:
        reg.register(svc("sage-a", port=6000))
        reg.register(svc("sage-a", port=7000, started=time.time() + 1))
        found = reg.lookup("sage")
        assert len(found) == 1 and found[0].port == 7000
        assert len(reg.all()) == 1


def test_twenty_processes_at_once_lose_nothing(registry_spec_factory):
    spec = registry_spec_factory(ttl=120)
    ctx = multiprocessing.get_context("spawn")
    workers, services, beats = 20, 10, 5
    with ctx.Pool(workers) as pool:
        accepted = pool.starmap(registry_workers.register_and_heartbeat,
                                [(spec, w, services, beats) for w in range(workers)])
    assert accepted == [services * beats] * workers
    with open_registry(spec) as reg:
        ids = {s.service_id for s in reg.lookup("sage")}
    assert ids == {f"w{w}-s{i}" for w in range(workers) for i in range(services)}


def test_writer_sigkilled_mid_run_leaves_registry_readable(registry_spec_factory, tmp_path):
    spec = registry_spec_factory(ttl=120)
    log = tmp_path / "committed.log"
    proc = multiprocessing.get_context("spawn").Process(target=registry_workers.write_forever,
                                                        args=(spec, str(log)))
    proc.start()
    deadline = time.time() + 60
    while time.time() < deadline and (not log.exists() or log.read_text().count("\n") < 30):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    committed = [line for line in log.read_text().splitlines() if line]
    assert len(committed) >= 30
    with open_registry(spec) as reg:
        live = {s.service_id for s in reg.lookup("hub")}
        reg.register(svc("after-crash"))  # still writable
        assert reg.get("after-crash") is not None
    assert set(committed) <= live


def test_heartbeat_of_a_taken_over_id_fails_so_the_owner_registers_again(registry_spec_factory):
    with open_registry(registry_spec_factory()) as reg:
        mine = svc("sage-a")
        reg.register(mine)
        assert reg.heartbeat("sage-a", owner=mine) is True
        reg.register(Service(role="sage", service_id="sage-a", host="127.0.0.1", port=6666, job_id="999"))  # a takeover
        assert reg.heartbeat("sage-a", owner=mine) is False  # the hijacked row is not kept alive
        reg.register(mine)  # what the wrapper's Heartbeat does on False
        got = reg.get("sage-a")
        assert (got.job_id, got.port) == ("42", 6000) and reg.heartbeat("sage-a", owner=mine) is True


@pytest.mark.parametrize("host, port", [("evil\nSTOP", 6000), ("\x1b]0;owned\x07", 6000), ("", 6000),
                                        ("-oProxyCommand=x", 6000), ("127.0.0.1", 0), ("127.0.0.1", 70000)])
def test_rows_with_an_invalid_endpoint_are_not_read(registry_spec_factory, host, port):
    with open_registry(registry_spec_factory()) as reg:
        reg.register(svc("sage-ok"))
        reg.register(Service(role="sage", service_id="sage-bad", host=host, port=port))
        assert [s.service_id for s in reg.lookup("sage")] == ["sage-ok"]
        assert [s.service_id for s in reg.all()] == ["sage-ok"]
        assert reg.get("sage-bad") is None


def test_shared_state_rows_are_kept_by_kind(registry_spec_factory):
    with open_registry(registry_spec_factory()) as reg:
        assert reg.read_state("desired") == {}
        reg.write_state("desired", "sage", "2")
        reg.write_state("desired", "hub", "1")
        reg.write_state("ledger:slurm", "42", '{"job_id": "42"}')
        reg.write_state("desired", "sage", "3")  # replaces
        assert reg.read_state("desired") == {"sage": "3", "hub": "1"}
        reg.write_state("desired", "hub", None)
        assert reg.read_state("desired") == {"sage": "3"}
        assert reg.read_state("ledger:slurm") == {"42": '{"job_id": "42"}'}
    with open_registry(registry_spec_factory()) as other:
        assert other.read_state("desired") == {}  # a fresh registry shares nothing


def test_a_lease_has_one_holder_and_each_new_holder_a_greater_token(registry_spec_factory):
    with open_registry(registry_spec_factory()) as reg:
        assert reg.lease("controller") is None
        a = reg.acquire_lease("controller", "a", 30)
        assert a is not None and reg.acquire_lease("controller", "b", 30) is None
        info = reg.lease("controller")
        assert (info.holder, info.token) == ("a", a) and 0 < info.remaining <= 30
        assert reg.renew_lease("controller", "a", a, 30) and reg.lease_valid("controller", "a", a)
        assert not reg.renew_lease("controller", "b", a, 30)  # not b's
        reg.release_lease("controller", "b", a)  # not b's to release: nothing happens
        assert reg.lease_valid("controller", "a", a)
        reg.release_lease("controller", "a", a)
        assert reg.lease("controller") is None
        b = reg.acquire_lease("controller", "b", 30)
        assert b is not None and b > a
        assert not reg.renew_lease("controller", "a", a, 30) and not reg.lease_valid("controller", "a", a)
        assert reg.lease_valid("controller", "b", b)
        assert reg.acquire_lease("other", "a", 30) is not None  # leases are by name


def test_an_expired_lease_passes_on_and_the_old_token_stays_stale(registry_spec_factory):
    with open_registry(registry_spec_factory()) as reg:
        a = reg.acquire_lease("controller", "a", 2)
        assert a is not None
        deadline = time.time() + 6
        while reg.lease("controller") is not None and time.time() < deadline:
            time.sleep(0.25)
        assert reg.lease("controller") is None
        assert not reg.renew_lease("controller", "a", a, 2)  # paused past its lease: cannot renew
        b = reg.acquire_lease("controller", "b", 30)
        assert b is not None and b > a
        a2 = reg.acquire_lease("controller", "a", 30)
        assert a2 is None and not reg.lease_valid("controller", "a", a)
