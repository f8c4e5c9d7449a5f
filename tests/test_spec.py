"""The cluster spec: the shipped examples load; every class of bad input gives one line and 78."""
from __future__ import annotations

import json

import pytest

from cluster.errors import SpecError
from cluster.spec import load_spec
from tests.conftest import REPO

GOOD = """
store: ./store
roles:
  sage: {image: demo@1, port: 6000, vcpus: 2, count: 1}
"""


@pytest.mark.parametrize("name", ["cluster.yaml", "site.yaml"])
def test_shipped_examples_load(name):
    spec = load_spec(REPO / "examples" / name)
    assert set(spec.roles) == {"sage", "hub", "cassandra"}
    assert spec.roles["cassandra"].persistent[0].name == "data"


def test_relative_paths_resolve_against_the_spec_file(tmp_path):
    (tmp_path / "cluster.yaml").write_text(GOOD)
    spec = load_spec(tmp_path / "cluster.yaml")
    assert spec.store == str(tmp_path / "store")
    assert spec.sqlite_path == tmp_path / "store" / "state" / "registry.sqlite"
    assert spec.registry.backend == "sqlite" and spec.scheduler.backend == "local"


BAD = [
    ("wrong type", "roles: {sage: {image: demo@1, port: 6000, vcpus: two}}",
     "roles.sage.vcpus: input should be a valid integer, got 'two'"),
    ("unknown key", "roles: {sage: {image: demo@1, port: 6000, vcpu: 2}}",
     "roles.sage.vcpu: unknown key (expected one of: image, port, vcpus"),
    ("unknown section", "roles: {}\nschedular: {backend: slurm}", "schedular: unknown key (expected one of: roles, site"),
    ("missing role field", "roles: {sage: {image: demo@1}}", "roles.sage.port: required field is missing"),
    ("negative count", "roles: {sage: {image: demo@1, port: 6000, count: -1}}",
     "roles.sage.count: input should be greater than or equal to 0, got -1"),
    ("yaml syntax", "roles: {sage: {image: demo@1\n", "malformed YAML at line 2, column 1"),
    ("duplicate key", "roles: {}\nscheduler: {backend: slurm}\nscheduler: {backend: local}",
     "malformed YAML at line 3, column 1: key 'scheduler' appears twice in one mapping"),
    ("not a mapping", "- a\n- b", "expected a mapping of sections"),
    ("image escaping the store", "roles: {sage: {image: ../../etc@1, port: 1}}", "roles.sage.image: expected NAME@VERSION"),
    ("bad scheduler", "roles: {}\nscheduler: {backend: lsf}", "scheduler.backend: input should be 'local', 'slurm'"),
    ("bad submit user", "roles: {}\nscheduler: {backend: slurm, submit_user: '-u root'}",
     "scheduler.submit_user: expected a user name ([A-Za-z_][A-Za-z0-9_.-]*), got '-u root'"),
    ("two registries", "roles: {}\nregistry: {sqlite: /tmp/x, cassandra: {contact_points: [a]}}",
     "registry: give either 'sqlite' or 'cassandra', not both"),
    ("unknown host key", "roles: {}\nhypervisor: {hosts: [hv0, {name: hv1, rack: 3}]}",
     "hypervisor.hosts[1].rack: unknown key (expected one of: name, address, vm_range)"),
    ("bad host address", "roles: {}\nhypervisor: {hosts: [{name: hv1, address: '10.0.0.300'}]}",
     "hypervisor.hosts[0].address: expected an IPv4 or IPv6 address, got '10.0.0.300'"),
    ("host listed twice", "roles: {}\nhypervisor: {hosts: [hv1, hv2, hv1]}",
     "hypervisor.hosts: 'hv1' is listed twice (entries 0 and 2)"),
    ("hosts-only tracker without addresses", "roles: {}\nimgdist: {tracker_hosts_only: true}\n"
     "hypervisor: {hosts: ['10.0.0.1', hv2]}", "hypervisor.hosts[1] (hv2) has no address"),
]


@pytest.mark.parametrize("case,text,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_spec_gives_one_line_naming_file_and_field(tmp_path, cli, case, text, expected):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert expected in str(exc.value)
    result = cli("services", "--spec", str(path))
    assert result.returncode == 78
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert str(path) in result.stderr and expected in result.stderr
    assert "Traceback" not in result.stderr


def test_unreadable_spec(tmp_path, cli):
    missing = cli("services", "--spec", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 78 and "nope.yaml: cannot read spec: No such file" in missing.stderr
    directory = cli("services", "--spec", str(tmp_path))
    assert directory.returncode == 78 and "cannot read spec" in directory.stderr


def test_spec_lookup_order(tmp_path, cli):
    (tmp_path / "env.yaml").write_text(GOOD.replace("./store", str(tmp_path / "envstore")))
    none = cli("services", cwd=tmp_path, env={"SALVUS_SPEC": ""})
    assert none.returncode == 78 and "no spec" in none.stderr
    from_env = cli("services", "--json", cwd=tmp_path, env={"SALVUS_SPEC": str(tmp_path / "env.yaml")})
    assert from_env.returncode == 0 and json.loads(from_env.stdout) == []
    assert (tmp_path / "envstore" / "state" / "registry.sqlite").exists()
    (tmp_path / "cluster.yaml").write_text("roles: {sage: {image: demo@1}}")  # ./cluster.yaml wins
    local = cli("services", cwd=tmp_path, env={"SALVUS_SPEC": str(tmp_path / "env.yaml")})
    assert local.returncode == 78 and "roles.sage.port" in local.stderr


def test_unknown_role_is_an_error(tmp_path, cli):
    (tmp_path / "cluster.yaml").write_text(GOOD)
    r = cli("services", "hubb", "--spec", str(tmp_path / "cluster.yaml"))
    assert r.returncode == 78 and "roles.hubb: no such role (the spec defines: sage)" in r.stderr
