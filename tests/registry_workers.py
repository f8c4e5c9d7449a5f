"""Worker processes for the registry concurrency tests (importable, so `spawn` can run them)."""
from __future__ import annotations

import os
import time

from cluster.registry import Service, open_registry


def register_and_heartbeat(spec, worker: int, services: int, beats: int) -> int:
    """Registers `services` services, heartbeats each `beats` times; returns heartbeats accepted."""
    accepted = 0
    with open_registry(spec) as reg:
        ids = [f"w{worker}-s{i}" for i in range(services)]
        for sid in ids:
            reg.register(Service(role="sage", service_id=sid, host="127.0.0.1", port=10000 + worker,
                                 hypervisor=f"hv{worker}", scheduler="local", job_id=str(os.getpid()),
                                 image="demo@1"))
        for _ in range(beats):
            for sid in ids:
                accepted += reg.heartbeat(sid)
    return accepted


def write_forever(spec, committed_log: str) -> None:
    """Registers services one after another, appending each id to a log only after its commit,
    until killed."""
    with open_registry(spec) as reg, open(committed_log, "a", buffering=1) as log:
        i = 0
        while True:
            sid = f"victim-{i}"
            reg.register(Service(role="hub", service_id=sid, host="127.0.0.1", port=8080))
            reg.heartbeat(sid)
            log.write(sid + "\n")
            i += 1
            if i % 50 == 0:
                time.sleep(0)
