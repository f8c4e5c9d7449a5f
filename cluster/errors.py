"""Errors that end a command with one line on stderr and a meaningful exit code.

The exit codes are the job contract of ARCHITECTURE.md: schedulers map them to retry policy.
"""
from __future__ import annotations

import os

EXIT_OK = 0
EXIT_DATAERR = os.EX_DATAERR  # 65: the image or its trust is bad; retrying will not help
EXIT_TEMPFAIL = os.EX_TEMPFAIL  # 75: transient; the scheduler should retry
EXIT_CONFIG = os.EX_CONFIG  # 78: the spec or the request is wrong; retrying will not help


class SalvusError(Exception):
    """An error a user can act on: printed as one line, never as a traceback."""

    exit_code = 1


class SpecError(SalvusError):
    exit_code = EXIT_CONFIG


class DataError(SalvusError):
    exit_code = EXIT_DATAERR


class TempFailure(SalvusError):
    exit_code = EXIT_TEMPFAIL


class RegistryUnavailable(TempFailure):
    """The registry cannot be reached right now (a wrapper keeps its VM and retries)."""


class RegistryMisconfigured(SpecError):
    """The registry answered but refuses this configuration (wrong credentials, a keyspace holding
    another application's tables, a replication the consistency level can never meet): exit 78,
    so a scheduler holds the job instead of retrying it forever."""


class SchedulerUnavailable(TempFailure):
    """The scheduler's commands or daemon cannot be reached (exit 75: try again later)."""


class SchedulerError(SalvusError):
    """The scheduler answered, but not in a way we can use (rejected job, unparseable output)."""
