"""An optional dependency group that is not installed (an execute node installs none it does not
need): the command that needs it refuses in one line naming the group, exit 78, no traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from cluster.errors import SpecError
from cluster.extras import require
from tests.fixtures.demo_image import demo_spec_text

# Python treats a None in sys.modules as "this module cannot be imported": the module is missing
# for that process only, without touching the installed environment.
WITHOUT = "import sys; sys.modules[{module!r}] = None; import salvus_jobs; sys.exit(salvus_jobs.main({argv!r}))"


def run_without(module: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT.format(module=module, argv=list(argv))],
                          capture_output=True, text=True, timeout=60)


def test_require_names_the_group_to_install():
    with pytest.raises(SpecError, match=r"scheduler.backend: condor needs the Python module 'no_such_mod_x'.*"
                                        r"pip install 'salvus-jobs\[condor\]'"):
        require("no_such_mod_x", "condor", "scheduler.backend: condor")


@pytest.mark.parametrize("module, scheduler, registry, says", [
    ("htcondor2", "{backend: condor}", "{ttl: 6, heartbeat_interval: 1}", "scheduler.backend: condor needs the Python module 'htcondor2'"),
    ("cassandra.cluster", "{backend: local}", "{ttl: 6, heartbeat_interval: 1, cassandra: {contact_points: ['127.0.0.1']}}",
     "registry.cassandra needs the Python module 'cassandra.cluster'"),
])
def test_a_missing_group_is_one_line_exit_78(tmp_path, demo_image, module, scheduler, registry, says):
    spec = tmp_path / "cluster.yaml"
    text = demo_spec_text(demo_image, tmp_path / "store").replace("registry: {ttl: 6, heartbeat_interval: 1}",
                                                                  f"registry: {registry}")
    spec.write_text(f"site: x\nscheduler: {scheduler}\n" + text)
    r = run_without(module, "--spec", str(spec), "status")
    assert r.returncode == 78, r.stderr
    assert r.stderr.startswith(f"salvus_jobs: {says}") and r.stderr.count("\n") == 1, r.stderr


def test_a_missing_drmaa_is_one_line_before_the_helper_runs(tmp_path, demo_image):
    spec = tmp_path / "cluster.yaml"
    spec.write_text("site: x\nscheduler: {backend: drmaa}\n" + demo_spec_text(demo_image, tmp_path / "store"))
    r = run_without("drmaa", "--spec", str(spec), "scale", "sage=1")
    assert r.returncode == 78, r.stderr
    assert r.stderr.startswith("salvus_jobs: scheduler.backend: drmaa needs the Python module 'drmaa'"), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
