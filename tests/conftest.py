"""Shared fixtures. Fixtures that start real daemons (Slurm, Grid Engine, Cassandra, libvirt) live
in their own conftest-loaded modules under tests/fixtures/."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = [f"tests.fixtures.{p.stem}" for p in sorted((REPO / "tests" / "fixtures").glob("[a-z]*.py"))]
pytest_plugins.append("tests.suite_groups")  # groups: xdist scheduling and the time budget


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 120,
            program: str = "salvus_jobs") -> subprocess.CompletedProcess:
    """Runs one of the project's console scripts as a user would, capturing its output."""
    exe = Path(sys.executable).parent / program
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)


@pytest.fixture
def cli():
    return run_cli
