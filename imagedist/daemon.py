"""`imgdist --daemon`: a sync pass every interval, seeding in between, until SIGTERM."""
from __future__ import annotations

import logging
import signal
import threading
import time

from cluster.errors import SalvusError
from cluster.spec import ClusterSpec
from imagedist.state import is_enabled, write_status
from imagedist.store import store_lock
from imagedist.sync import Agent, select_entries

log = logging.getLogger(__name__)

# Between passes the daemon drains libtorrent's alerts without blocking and sleeps on the SIGHUP
# event: a signal can't interrupt libtorrent's wait_for_alert, so sleeping in there would delay a
# pass by up to the wait.
SEED_PUMP_SECONDS = 0.2


def _accepted_index(spec: ClusterSpec):
    from catalogue.trust import accepted_index

    return accepted_index(spec)


def run_daemon(spec: ClusterSpec, interval: float) -> int:
    """Passes every `interval` seconds; SIGHUP starts one now (a new index was published)."""
    stop = threading.Event()
    wake = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: wake.set())
    agent = Agent(spec)
    with store_lock(agent.store, wait=False):
        agent.listen()  # before the first pass: a pull should not wait for the session to start
        try:
            while not stop.is_set():
                try:
                    r = agent.sync_pass(should_stop=stop.is_set)
                    if r.disabled:
                        log.info("disabled: not pulling or seeding (imgdist --enable)")
                    for ref, why in r.failed.items():
                        log.error("%s: %s", ref, why)
                except SalvusError as e:
                    log.error("sync pass failed: %s", e)
                    _keep_seeding_last_index(agent, spec)
                except Exception as e:  # one bad pass must not end the seeding
                    # A bug, or a failure no check turned into a SalvusError (whatever an origin
                    # sends must not be able to stop this host serving its peers).
                    log.error("sync pass failed unexpectedly: %s: %s", type(e).__name__, e)
                    log.debug("the failed pass", exc_info=True)
                    _keep_seeding_last_index(agent, spec)
                _seed_until(agent, time.monotonic() + interval, stop, wake)
                if wake.is_set():
                    log.info("SIGHUP: starting a pass now")
                wake.clear()
        finally:
            agent.close()
            agent.status.images.clear()
            write_status(agent.store, agent.status)
    return 0


def _keep_seeding_last_index(agent: Agent, spec: ClusterSpec) -> None:
    """The origin being down is no reason to stop serving what the last accepted index allows."""
    try:
        index = _accepted_index(spec)
        if index is not None and is_enabled(agent.store):
            agent.seed_installed(select_entries(spec, index).wanted)
    except Exception as e:  # as for a pass: keep the daemon up
        log.error("cannot seed from the last accepted index: %s", e)


def _seed_until(agent: Agent, deadline: float, stop: threading.Event, wake: threading.Event) -> None:
    enabled = is_enabled(agent.store)
    while not stop.is_set() and not wake.is_set() and time.monotonic() < deadline:
        if agent.has_swarm:
            agent.swarm.pump(0)
        wake.wait(SEED_PUMP_SECONDS)
        now_enabled = is_enabled(agent.store)
        if enabled and not now_enabled:
            log.info("disabled: stopped seeding")
            agent.stop_seeding()
            write_status(agent.store, agent.status)
        elif now_enabled and not enabled:
            return  # enabled again: start a pass now
        enabled = now_enabled
