"""`salvus_jobs network up | down`: a hypervisor's part of the site network (root, once per host)."""
from __future__ import annotations

import argparse
import logging

from cluster import unfit
from cluster.registry import open_registry
from cluster.spec import ClusterSpec, load_spec
from jobwrappers.sitenet import host
from jobwrappers.sitenet.layout import host_identity


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("network", parents=[common], help="set up or remove this host's site network (root)",
                       description="The site network (roles with network: site): this hypervisor's bridge, "
                                   "its VXLAN link to the other hosts of hypervisor.hosts and the base "
                                   "nftables rules. Idempotent: what already matches the spec is left alone.")
    nsub = p.add_subparsers(dest="network_command", metavar="COMMAND", required=True)
    for name, what in (("up", "create or correct this host's bridge, VXLAN and rules"),
                       ("down", "remove them (stop this host's VMs first)"),
                       ("check", "exit 0 if this host can run site jobs, else one 'ERROR ...' line and 75: "
                                 "a node health check (Torque's $node_check_script marks the node down on "
                                 "it) for schedulers that cannot be told to avoid a host")):
        q = nsub.add_parser(name, parents=[common], help=what, description=what,
                            epilog=f"example: salvus_jobs network {name} --spec /etc/salvus/cluster.yaml --host hv1")
        q.add_argument("--host", help="this host's entry in hypervisor.hosts (default $SALVUS_HYPERVISOR, "
                                      "$SLURMD_NODENAME, then the hostname)")
        q.set_defaults(func=cmd_network)


def cmd_network(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    here = host_identity(args.host)
    if args.network_command == "check":
        problem = host.check(spec, here)
        if problem:
            print(f"ERROR salvus: {here}: {problem}: run `salvus_jobs network up --spec {spec.source} "
                  f"--host {here}` as root")
            return 75
        print(f"{here}: site network ready")
        return 0
    done = (host.up if args.network_command == "up" else host.down)(spec, here)
    if args.network_command == "up":
        done += clear_unfit(spec, here)
    for line in done:
        print(line)
    if not done:
        print(f"{here}: site network already {'as the spec says' if args.network_command == 'up' else 'absent'}; "
              "nothing changed")
    return 0


def clear_unfit(spec: ClusterSpec, here: str) -> list[str]:
    """Lifts the registry's unfit mark a failed job put on this host (cluster/unfit.py). Root
    must not create a SQLite registry (its job users could then not open it): none there, no mark."""
    if spec.registry.backend == "sqlite" and not spec.sqlite_path.exists():
        return []
    try:
        with open_registry(spec) as registry:
            cleared = unfit.clear(registry, here)
    except Exception as e:  # noqa: BLE001 - the host is set up; only the mark is left
        logging.getLogger(__name__).warning("%s: could not clear its unfit mark in the registry (%s): run "
                                            "`salvus_jobs network up` again once the registry answers", here, e)
        return []
    return [f"{here}: unfit mark cleared in the registry (site jobs may be placed here again)"] if cleared else []
