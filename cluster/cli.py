"""`salvus_jobs services`: what the registry says is live; `ssh`, `exec`, `console` (cluster/vmaccess.py)."""
from __future__ import annotations

import argparse
import json
import sys
import time

from cluster import vmaccess
from cluster.cliframe import format_age, format_table
from cluster.registry import open_registry
from cluster.spec import load_spec


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("services", parents=[common], help="list live services from the registry",
                       description="List the services whose heartbeats are current (a service "
                                   "disappears once its TTL passes without a heartbeat).",
                       epilog="example: salvus_jobs services sage --json")
    p.add_argument("role", nargs="?", help="only this role")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects")
    p.set_defaults(func=cmd_services)
    p = sub.add_parser("spec", parents=[common], help="the spec's JSON Schema, for editors",
                       description="Tools for cluster.yaml. 'schema' prints its JSON Schema (draft 2020-12), "
                                   "as strict as the loader: every section closed, so a misspelt key fails.",
                       epilog="example: salvus_jobs spec schema > cluster.schema.json  (then, first line of "
                              "cluster.yaml: # yaml-language-server: $schema=cluster.schema.json)")
    p.add_argument("what", choices=["schema"], help="what to print")
    p.set_defaults(func=cmd_spec)
    vmaccess.add_commands(sub, common)


def cmd_spec(args: argparse.Namespace) -> int:
    from cluster.spec_schema import spec_json_schema

    json.dump(spec_json_schema(), sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


def cmd_services(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    if args.role:
        spec.role(args.role)  # a typo in the role is an error, not an empty list
    with open_registry(spec) as registry:
        services = registry.lookup(args.role) if args.role else registry.all()
    if args.json:
        json.dump([s.to_dict() for s in services], sys.stdout, indent=2)
        print()
        return 0
    now = time.time()
    rows = [[s.role, s.service_id, s.endpoint, s.hypervisor, f"{s.scheduler}:{s.job_id}", s.image,
             format_age(now - s.started), f"{format_age(now - s.last_heartbeat)} ago"] for s in services]
    print(format_table(["ROLE", "SERVICE", "ENDPOINT", "HYPERVISOR", "JOB", "IMAGE", "AGE", "HEARTBEAT"], rows))
    if not services:
        print("(no live services)")
    return 0
