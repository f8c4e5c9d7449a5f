"""`salvus_jobs services` over a real SQLite registry."""
from __future__ import annotations

import json

from cluster.registry import Service, open_registry
from cluster.spec import load_spec

SPEC = "store: ./store\nroles: {sage: {image: demo@1, port: 6000}, hub: {image: demo@1, port: 8080}}\n"


def test_services_lists_live_services_as_table_and_json(tmp_path, cli):
    path = tmp_path / "cluster.yaml"
    path.write_text(SPEC)
    with open_registry(load_spec(path)) as reg:
        reg.register(Service(role="sage", service_id="sage-1", host="127.0.0.1", port=40001,
                             hypervisor="hv1", scheduler="slurm", job_id="17", image="demo@1"))
        reg.register(Service(role="hub", service_id="hub-1", host="127.0.0.1", port=40002))
    as_json = cli("--spec", str(path), "services", "sage", "--json")
    assert as_json.returncode == 0, as_json.stderr
    rows = json.loads(as_json.stdout)
    assert len(rows) == 1
    row = rows[0]
    for key in ("role", "service_id", "host", "port", "hypervisor", "job_id", "image", "started", "last_heartbeat"):
        assert key in row
    assert (row["service_id"], row["port"], row["job_id"], row["hypervisor"]) == ("sage-1", 40001, "17", "hv1")
    table = cli("services", "--spec", str(path))
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["ROLE", "SERVICE", "ENDPOINT"]
    assert any("sage-1" in line and "127.0.0.1:40001" in line and "slurm:17" in line for line in lines)
    assert any("hub-1" in line for line in lines)


def test_help_lists_commands(cli):
    r = cli("--help")
    assert r.returncode == 0 and "services" in r.stdout and "--spec" in r.stdout
