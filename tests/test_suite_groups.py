"""The suite's own grouping (tests/suite_groups.py): which group a test falls into decides the xdist
worker it shares and the budget it is counted against, and README.md lists the same budgets."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.suite_groups import GROUPS, QUEUE_ORDER, group_of

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


@dataclass
class FakeItem:
    """What group_of reads of a pytest item: its markers, fixture closure and module."""

    module_name: str
    markers: tuple[str, ...] = ()
    fixturenames: list[str] = field(default_factory=list)

    @property
    def module(self):
        return SimpleNamespace(__name__=f"tests.{self.module_name}")

    def get_closest_marker(self, name: str):
        return getattr(pytest.mark, name) if name in self.markers else None


@pytest.mark.parametrize("item,group", [
    (FakeItem("test_controller", ("vm", "slurm"), ["slurm_cluster"]), "slurm"),
    (FakeItem("test_succession", ("vm", "slow", "slurm")), "slurm"),  # a Slurm soak shares the Slurm daemons
    (FakeItem("test_succession", ("vm", "slow")), "soak"),
    (FakeItem("test_job_environment", ("sge",), ["gridengine"]), "gridengine"),
    (FakeItem("test_registry", ("cassandra",)), "cassandra"),  # the cassandra param of the registry suite
    (FakeItem("test_firmware", ("vm",), ["libvirt_uri"]), "libvirt"),
    (FakeItem("test_firmware", ("vm",), ["booted"]), "vm"),
    (FakeItem("test_site_network_parts", ()), "site-network"),
    (FakeItem("test_real_guest", ("slow", "vm")), "real-image"),
    (FakeItem("test_hostile_origin", ()), "imgdist"),
    (FakeItem("test_spec", ()), "unit"),
])
def test_each_test_falls_into_the_group_of_its_daemon_or_module(item, group):
    assert group_of(item).name == group


def test_daemon_groups_run_together_and_the_rest_by_module():
    together = {g.name for g in GROUPS if g.together}
    assert {"slurm", "gridengine", "cassandra", "libvirt", "site-network", "imgdist", "real-image"} <= together
    assert not {"vm", "unit", "soak"} & together
    assert sorted(QUEUE_ORDER) == sorted(g.name for g in GROUPS)
    assert GROUPS[-1].name == "unit" and not (GROUPS[-1].markers or GROUPS[-1].fixtures or GROUPS[-1].modules)


def test_the_readme_lists_every_group_with_its_budget():
    text = README.read_text()
    section = text[text.index("### Test time"):]
    rows = dict(re.findall(r"^\| `([a-z-]+)` \|[^|]*\| (\d+) \|", section, re.M))
    assert rows == {g.name: str(g.budget_s) for g in GROUPS}
    assert f"{sum(g.budget_s for g in GROUPS)}" in section


def test_a_group_runs_on_one_xdist_worker_and_each_module_on_one(tmp_path):
    """The grouping with the installed pytest and xdist (pytest 9.2 broke xdist 3.8's loadgroup: every
    test was sent anywhere, and each worker started its own Slurm)."""
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.suite_groups"]\n')
    for module, mark in (("test_a", "@pytest.mark.slurm\n"), ("test_b", "@pytest.mark.slurm\n"), ("test_c", ""),
                         ("test_d", "")):
        (tmp_path / f"{module}.py").write_text("import pytest\n" + "".join(
            f"{mark}def test_{i}():\n    pass\n" for i in range(4)))
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup",
                        "-v", "-W", "ignore::pytest.PytestUnknownMarkWarning", str(tmp_path)],
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    ran = re.findall(r"^\[(gw\d)\] .*PASSED (test_[a-d])\.py::test_\d@(\S+)", r.stdout, re.M)
    assert len(ran) == 16, r.stdout
    workers = {module: {w for w, m, _ in ran if m == module} for module in ("test_a", "test_b", "test_c", "test_d")}
    assert all(len(w) == 1 for w in workers.values()), workers
    assert workers["test_a"] == workers["test_b"]  # one Slurm group across modules
    assert {scope for _, m, scope in ran if m == "test_c"} == {"unit:test_c"}
    assert "time by group" in r.stdout and re.search(r"^slurm +8 ", r.stdout, re.M), r.stdout
