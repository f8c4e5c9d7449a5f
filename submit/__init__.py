"""Scheduler backends: one small class per scheduler (local, condor, pbs, slurm, drmaa)."""
from __future__ import annotations

import importlib

from cluster.errors import SpecError
from cluster.spec import ClusterSpec
from submit.base import Backend, Job
from submit.runner import CommandRunner

# name -> "module:Class", imported on use so a site without HTCondor or DRMAA never loads them.
BACKENDS = {
    "local": "submit.local:LocalBackend",
    "slurm": "submit.slurm:SlurmBackend",
    "pbs": "submit.pbs:PbsBackend",
    "condor": "submit.condor:CondorBackend",
    "drmaa": "submit.drmaa:DrmaaBackend",
}


def open_backend(spec: ClusterSpec, name: str | None = None, runner: CommandRunner | None = None) -> Backend:
    """The backend `name` (default: the spec's `scheduler.backend`) bound to `spec`; its client
    commands run through `runner` (default: on this machine, from `scheduler.bin_dir` or PATH)."""
    name = name or spec.scheduler.backend
    if name not in BACKENDS:
        raise SpecError(f"unknown scheduler {name!r} (expected one of: {', '.join(BACKENDS)})")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(spec, runner)


__all__ = ["Backend", "CommandRunner", "Job", "open_backend", "BACKENDS"]
