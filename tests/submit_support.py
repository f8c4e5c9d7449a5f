"""Helpers shared by the scheduler tests (test_submit_*.py)."""
from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest

from cluster.errors import SalvusError
from cluster.spec import load_spec
from submit.scale import stop_roles
from tests.fixtures.demo_image import demo_spec_text

_sites = itertools.count()


def scheduler_spec(tmp_path: Path, demo_image, backend: str, extra: str = "",
                   image_path: str | None = None) -> Path:
    """A demo-image spec on `backend` with a site name of its own (tests share one queue)."""
    path = tmp_path / "cluster.yaml"
    text = demo_spec_text(demo_image, tmp_path / "store")
    if image_path:
        text = text.replace(f"image_path: {demo_image.disk}", f"image_path: {image_path}")
    site = f"{backend[0]}{next(_sites)}{tmp_path.name[-6:].replace('_', '')}"
    path.write_text(f"site: {site}\nscheduler: {{backend: {backend}{extra}}}\n" + text)
    return path


def standin_spec(tmp_path: Path, scheduler: str, image: str = "demo@1") -> Path:
    """A one-role spec (sage) with a site name of its own whose jobs run a stand-in for
    salvus-vmjob that sleeps until cancelled: no VM ever boots. `scheduler`: the scheduler
    section's fields besides `wrapper`, e.g. "backend: slurm, extra_directives: [--hold]"."""
    standin = tmp_path / "vmjob"
    standin.write_text("#!/bin/sh\nexec sleep 300\n")
    standin.chmod(0o755)
    spec = tmp_path / "jobs.yaml"
    spec.write_text(f"site: s{next(_sites)}{tmp_path.name[-6:].replace('_', '')}\nstore: {tmp_path / 'store'}\n"
                    f"scheduler: {{{scheduler}, wrapper: {standin}}}\n"
                    f"roles: {{sage: {{image: {image}, port: 6000}}}}\n")
    return spec


@pytest.fixture
def stop_everything_after():
    """Collects spec paths; at teardown stops every job of those specs (a failed test must not
    leave VMs or queued jobs behind)."""
    specs: list[Path] = []
    yield specs.append
    for path in specs:
        try:
            spec = load_spec(path)
            stop_roles(spec, list(spec.roles), wait=True, timeout=60)
        except SalvusError as e:
            logging.getLogger(__name__).warning("cleanup of %s: %s", path, e)


