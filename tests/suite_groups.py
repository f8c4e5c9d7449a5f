"""How the suite splits into groups, and what each group may cost (a pytest plugin).

Every test falls into one group: the first rule of GROUPS that matches it. A group is two things:

- A unit of scheduling. `scripts/test` runs two xdist workers with `--dist loadgroup`: the tests of
  a group that shares a session daemon (Slurm, Grid Engine, Cassandra, libvirtd) or machine-wide
  state (the site network's host directories, imgdist's fixed loopback peers) run on one worker, so
  the daemon starts once and no two workers share a queue, a port, a store or a namespace name. The
  real-image boots run one module after another too: each keeps the cores busy by itself, and two at
  once only slowed both (a real guest's boot took 202 s beside another, 143 s without).
  Every other test is scheduled with the rest of its module, so a module-scoped boot happens once.
  Work is queued in QUEUE_ORDER: the long groups first (longest-processing-time first), each group
  that keeps both cores busy (real-image) next to one that mostly waits on daemon timers (slurm,
  soak), and the short modules last, to fill the gaps.
- A budget. At the end of a run the suite prints the seconds each group took (setup, call and
  teardown, summed over its tests) against its budget, and the run's wall time. A group over its
  budget is flagged, not failed: tests check behaviour, not timings. An issue that adds tests says
  which group they join and stays inside that group's budget, or raises it with the reason.

README.md ("Test time") lists the same budgets; tests/test_suite_groups.py checks that the two agree.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

USER_PROPERTY = "suite_group"


@dataclass(frozen=True)
class Group:
    name: str
    budget_s: int
    what: str
    markers: tuple[str, ...] = ()
    fixtures: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    # One xdist scope for the whole group (shared daemon or machine-wide state), or one per module.
    together: bool = False

    def matches(self, item: pytest.Item) -> bool:
        return (any(item.get_closest_marker(m) for m in self.markers)
                or any(f in item.fixturenames for f in self.fixtures)
                or item.module.__name__.rpartition(".")[2] in self.modules)


GROUPS: tuple[Group, ...] = (
    Group("slurm", 450, "the real Slurm (and its PBS wrappers): submit, requeue, walltime, placement",
          markers=("slurm",), fixtures=("slurm_cluster",), together=True),
    Group("condor", 420, "the real HTCondor pool (a central manager, two execute nodes): submit files, scale, "
          "remove, vacate, hold, retry, walltime", markers=("condor",), fixtures=("condor_pool",), together=True),
    Group("gridengine", 60, "the real Son of Grid Engine through DRMAA and qalter",
          markers=("sge",), fixtures=("gridengine",), together=True),
    Group("cassandra", 240, "the real Cassandra nodes: registry, TLS, the three-node ring",
          markers=("cassandra",), fixtures=("cassandra_node", "cassandra_tls_node"), together=True),
    Group("site-network", 210, "three emulated hypervisors in namespaces with site-network VMs",
          modules=("test_site_network", "test_site_network_parts"), together=True),
    Group("libvirt", 80, "a private libvirtd and the domains it runs", fixtures=("libvirt_uri",), together=True),
    Group("real-image", 600, "the Debian cloud image built from Debian's packages, booted for real",
          modules=("test_real_guest", "test_real_firmware", "test_debian_image"), together=True),
    Group("soak", 300, "walltime succession and rolling upgrades soaked with real demo VMs",
          modules=("test_succession",)),
    Group("imgdist", 210, "real libtorrent swarms, origins and trackers on loopback",
          modules=("test_imgdist_swarm", "test_imgdist_site", "test_imgdist_store", "test_imgdist_units",
                   "test_imgdist_writeback", "test_hostile_origin", "test_nginx_origin", "test_http_limits"),
          together=True),
    Group("vm", 420, "demo-guest boots on the local executor (about 5 s each under TCG)", markers=("vm",)),
    Group("unit", 330, "everything else: parsing, refusals, trust, and short single boots"),
)


# Scheduling order, as above; GROUPS' own order is the order its rules are tried in.
QUEUE_ORDER = ("slurm", "real-image", "condor", "soak", "cassandra", "imgdist", "site-network", "vm", "gridengine",
               "libvirt", "unit")


def group_of(item: pytest.Item) -> Group:
    return next((g for g in GROUPS if g.matches(item)), GROUPS[-1])


def _scope(group: Group, item: pytest.Item) -> str:
    return group.name if group.together else f"{group.name}:{item.module.__name__}"


def pytest_itemcollected(item: pytest.Item) -> None:
    # Marked as each item is made: xdist's worker turns the marks into its scopes in its own
    # pytest_collection_modifyitems, which may run before any other plugin's.
    group = group_of(item)
    item.user_properties.append((USER_PROPERTY, group.name))
    item.add_marker(pytest.mark.xdist_group(_scope(group, item)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    order = {name: i for i, name in enumerate(QUEUE_ORDER)}
    rank = {item: (order[dict(item.user_properties)[USER_PROPERTY]], index) for index, item in enumerate(items)}
    # Deterministic (every xdist worker must collect the same order): by group, then as collected.
    items.sort(key=rank.__getitem__)


class _Tally:
    """Sums each group's test time from the reports (on xdist's controller, from every worker)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.seconds: dict[str, float] = {}
        self.tests: dict[str, set[str]] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        group = dict(report.user_properties).get(USER_PROPERTY)
        if group is not None:
            self.seconds[group] = self.seconds.get(group, 0.0) + report.duration
            self.tests.setdefault(group, set()).add(report.nodeid)

    def pytest_terminal_summary(self, terminalreporter, config: pytest.Config) -> None:
        if not self.tests:
            return
        tr = terminalreporter
        tr.section("time by group (budgets: README.md, Test time)")
        tr.line(f"{'group':<14}{'tests':>6}{'spent s':>10}{'budget s':>10}")
        for g in GROUPS:
            if g.name in self.tests:
                spent = self.seconds.get(g.name, 0.0)
                flag = "  OVER BUDGET" if spent > g.budget_s else ""
                tr.line(f"{g.name:<14}{len(self.tests[g.name]):>6}{spent:>10.0f}{g.budget_s:>10}{flag}")
        workers = config.getoption("numprocesses", default=None) or 1
        tr.line(f"{'all':<14}{sum(len(t) for t in self.tests.values()):>6}{sum(self.seconds.values()):>10.0f}"
                f"{sum(g.budget_s for g in GROUPS):>10}   wall {time.monotonic() - self.started:.0f} s, "
                f"{workers} worker(s)")


def pytest_configure(config: pytest.Config) -> None:
    # xdist registers this marker too; declared here so a run with `-p no:xdist` keeps --strict-markers.
    config.addinivalue_line("markers", "xdist_group(name): tests of one group run on one xdist worker")
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist) reports
        config.pluginmanager.register(_Tally(), "salvus-suite-groups-tally")
